"""ShotStream for ComfyUI: the pack's entry point (ComfyUI imports this folder as a custom-node package).

Imports with no ComfyUI present (every host import is behind nodes/comfy_adapter.py), so tests and
scripts can load the pack the same way a host does.
"""
import importlib.util
import os
import sys
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))

# The engine package lives beside this file; when the pack sits in custom_nodes/ it is not on sys.path yet.
# Appended (not prepended) so nothing here shadows the host's own modules (the host also has a `nodes`).
if importlib.util.find_spec("shotstream_core") is None:
    sys.path.append(_HERE)

from .nodes import comfy_adapter as _host  # noqa: E402
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

WEB_DIRECTORY = "./web"

_host.register_model_folders()
_host.register_routes(Path(_HERE) / "workflows")  # for the web extension's ?load=

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
