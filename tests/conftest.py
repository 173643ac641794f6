"""Shared test set-up.

- The repo root is a ComfyUI pack (it has __init__.py): it is collected as a plain folder, not a package,
  so pytest never imports the ComfyUI entry point behind the tests' back (the `pack` fixture does, on purpose).
- One torch thread: the test models are tiny, and threads only oversubscribe a small shared CPU.
- `pack`: the repo imported as a ComfyUI custom-node package, the way a host does.
"""
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PACK_NAME = "ShotStream"


def pytest_collect_directory(path, parent):
    if path == REPO:
        return pytest.Dir.from_parent(parent, path=path)
    return None


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


def load_pack():
    """Import <repo>/__init__.py as package 'ShotStream' (ComfyUI's loader does the same with the folder name)."""
    if PACK_NAME in sys.modules:
        return sys.modules[PACK_NAME]
    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_NAME]
        raise
    return module


@pytest.fixture(scope="session")
def pack():
    return load_pack()
