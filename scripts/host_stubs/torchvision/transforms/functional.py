"""Stub of torchvision.transforms.functional: the enum is real, the functions raise."""
import enum

from .. import _unavailable


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


rotate = _unavailable("transforms.functional.rotate")
resize = _unavailable("transforms.functional.resize")


def __getattr__(name):
    return _unavailable(f"transforms.functional.{name}")
