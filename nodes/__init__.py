"""ComfyUI nodes of the ShotStream pack (the repo root's __init__.py exposes them to the host)."""
from .shotstream_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F401
