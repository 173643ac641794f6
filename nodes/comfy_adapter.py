"""Everything the pack needs from a ComfyUI host, behind one small surface.

Every `folder_paths` / `comfy.*` / `server` import of the pack lives here, so the pack (and its tests)
import with no host. Without a host: model lists hold only what `set_standalone_dirs` points at, the
output folder is a local one, progress is a no-op and interrupts never fire.

Folder names differ between hosts: old hosts (before Aug 2024) call them unet / clip / vae, new ones
diffusion_models / text_encoders / vae. We look in both, plus our own "shotstream" folder.
"""
from __future__ import annotations

import os
from pathlib import Path

try:  # a ComfyUI host is running us
    import folder_paths
    import comfy.model_management
    import comfy.utils

    HAS_HOST = True
except ImportError:
    folder_paths = None
    HAS_HOST = False

MODEL_EXTENSIONS = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")

# Our kind of model file -> host folder names searched, in order.
MODEL_FOLDERS = {
    "dit": ("shotstream", "diffusion_models", "unet"),
    "vae": ("shotstream", "vae"),
    "text_encoder": ("shotstream", "text_encoders", "clip"),
    "lora": ("loras",),
}

# Without a host: folders given by tests / scripts (kind -> list of dirs) and an output folder.
_standalone = {"models": {}, "output": None}


def set_standalone_dirs(models: dict[str, list[str | Path]] | None = None, output: str | Path | None = None):
    """For use without a host: where model files are listed from and where outputs are written."""
    if models is not None:
        _standalone["models"] = {k: [Path(p) for p in v] for k, v in models.items()}
    if output is not None:
        _standalone["output"] = Path(output)


def register_model_folders() -> None:
    """Add models/shotstream to the host's search paths (the 2-argument form works in old and new hosts)."""
    if HAS_HOST:
        folder_paths.add_model_folder_path("shotstream", os.path.join(folder_paths.models_dir, "shotstream"))


def _host_folders(kind: str) -> list[str]:
    names = folder_paths.folder_names_and_paths
    return [name for name in MODEL_FOLDERS[kind] if name in names]


def list_models(kind: str) -> list[str]:
    """File names (relative to their folder) of model files of this kind, deduplicated, sorted."""
    found = set()
    if HAS_HOST:
        for name in _host_folders(kind):
            found.update(folder_paths.get_filename_list(name))
    else:
        for root in _standalone["models"].get(kind, []):
            if root.is_dir():
                found.update(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return sorted(f for f in found if f.lower().endswith(MODEL_EXTENSIONS))


def model_search_dirs(kind: str) -> list[str]:
    if HAS_HOST:
        return [p for name in _host_folders(kind) for p in folder_paths.get_folder_paths(name)]
    return [str(p) for p in _standalone["models"].get(kind, [])]


def model_path(kind: str, filename: str) -> str | None:
    """Full path of a listed model file, or None when it is in none of the searched folders."""
    if HAS_HOST:
        for name in _host_folders(kind):
            path = folder_paths.get_full_path(name, filename)
            if path is not None:
                return path
        return None
    for root in _standalone["models"].get(kind, []):
        path = root / filename
        if path.is_file():
            return str(path)
    return None


def output_directory() -> Path:
    """The host's output folder, asked at call time (hosts set it after importing custom nodes)."""
    if HAS_HOST:
        return Path(folder_paths.get_output_directory())
    return _standalone["output"] or Path.cwd() / "output"


def temp_directory() -> Path:
    if HAS_HOST:
        return Path(folder_paths.get_temp_directory())
    return output_directory() / "temp"


def throw_if_interrupted() -> None:
    """Raise the host's interrupt exception if the user pressed Cancel / POST /interrupt."""
    if HAS_HOST:
        comfy.model_management.throw_exception_if_processing_interrupted()


class Progress:
    """The node's progress bar; `update` may carry a PIL preview image (updating is an interrupt point)."""

    PREVIEW_MAX_SIZE = 512

    def __init__(self, total: int):
        self.total = max(int(total), 1)
        self._bar = comfy.utils.ProgressBar(self.total) if HAS_HOST else None
        self.value = 0
        self.previews = 0  # counted even without a host, for tests

    def update(self, value: int, preview=None) -> None:
        self.value = int(value)
        self.previews += preview is not None
        if self._bar is not None:
            image = None if preview is None else ("JPEG", preview, self.PREVIEW_MAX_SIZE)
            self._bar.update_absolute(self.value, self.total, image)


def register_routes(workflows_dir: Path) -> bool:
    """Serve the pack's workflow files at /shotstream/workflows[/<name>] (for the web extension)."""
    if not HAS_HOST:
        return False
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return False
    if getattr(PromptServer, "instance", None) is None:
        return False
    routes = PromptServer.instance.routes

    @routes.get("/shotstream/workflows")
    async def list_workflows(request):
        names = sorted(p.name for p in workflows_dir.glob("*.json") if not p.name.endswith(".api.json"))
        return web.json_response(names)

    @routes.get("/shotstream/workflows/{name}")
    async def get_workflow(request):
        name = request.match_info["name"]
        path = (workflows_dir / name).resolve()
        if path.parent != workflows_dir.resolve() or path.suffix != ".json" or not path.is_file():
            return web.json_response({"error": f"no workflow named {name!r}"}, status=404)
        return web.FileResponse(path)

    return True
