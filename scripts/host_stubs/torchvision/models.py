"""Stub: every model constructor raises (see the package docstring)."""
from . import _unavailable

efficientnet_v2_s = _unavailable("models.efficientnet_v2_s")


def __getattr__(name):
    return _unavailable(f"models.{name}")
