"""ShotStream for ComfyUI: the pack's entry point (ComfyUI imports this folder as a custom-node package).

Imports with no ComfyUI present (every host import is behind nodes/comfy_adapter.py), so tests and
scripts can load the pack the same way a host does.
"""
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))


def _engine_folder(package) -> str | None:
    """The folder `package` (a shotstream_core already imported) takes its modules from."""
    engine = sys.modules.get("shotstream_core.engine")
    if engine is not None:
        return os.path.dirname(engine.__file__)
    return next((p for p in getattr(package, "__path__", []) if os.path.isfile(os.path.join(p, "engine.py"))), None)


def _use_own_engine() -> None:
    """Make `shotstream_core` this pack's copy of the engine. The pack folder is not put first on sys.path,
    since it would shadow the host's own modules (the host also has a `nodes`); and an engine installed
    elsewhere (a developer's `pip install -e` of another checkout) must not run under these nodes."""
    own = os.path.join(_HERE, "shotstream_core")
    loaded = sys.modules.get("shotstream_core")
    if loaded is not None:
        in_use = _engine_folder(loaded)
        if in_use is not None and os.path.realpath(in_use) == os.path.realpath(own):
            return  # ours already (a symlinked pack included)
        if any(name.startswith("shotstream_core.") for name in sys.modules):
            # its modules are in use (imported by a script or another pack before this one): cannot swap now
            warnings.warn(f"ShotStream: the engine already imported is {in_use}, not this pack's {own}; the "
                          "nodes may not match it. Remove the other copy (pip uninstall comfyui-shotstream), or "
                          "load the pack before whatever imports it")
            return
    spec = importlib.machinery.ModuleSpec("shotstream_core", None, is_package=True)
    spec.submodule_search_locations = [own]
    module = importlib.util.module_from_spec(spec)  # a namespace package whose one folder is ours
    sys.modules["shotstream_core"] = module


_use_own_engine()

from .nodes import comfy_adapter as _host  # noqa: E402
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

_host.register_model_folders()
_host.register_routes(Path(_HERE) / "workflows")  # for the web extension's ?load=

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
