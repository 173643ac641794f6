"""Import-time stand-in for torchvision, for the ComfyUI host process only.

The ComfyUI snapshot imports torchvision at module level (comfy/sd.py via Stable Cascade, one upscaler), and
transformers imports parts of it once it sees a `torchvision` package. The ShotStream nodes never use it and
there is no CPU torchvision build for torch 2.13 here. So every `torchvision.*` module imports (made up on
demand by a finder), every attribute exists, and anything that is actually *called* fails loudly.
scripts/comfy_host.py puts this folder on PYTHONPATH for the host process only.
"""
import enum
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+shotstream-stub"


class Unavailable:
    """A torchvision attribute: can be looked up, stored and imported; raises when called."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Unavailable(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"{self._name} is not available: this ComfyUI host runs with a torchvision import stub "
            "(scripts/host_stubs/torchvision); install a real torchvision to use nodes that need it")

    def __repr__(self):
        return f"<unavailable {self._name}>"


class InterpolationMode(enum.Enum):  # a real enum: code builds lookup tables from it at import time
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _StubModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr == "InterpolationMode":
            return InterpolationMode
        full = f"{self.__name__}.{attr}"
        return sys.modules.get(full) or Unavailable(full)


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes any torchvision.<sub> module importable."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.append(_Finder())


def __getattr__(attr):
    if attr == "InterpolationMode":
        return InterpolationMode
    return Unavailable(f"{__name__}.{attr}")
