"""Shared test fixtures. `pack`: the repo imported as a ComfyUI custom-node package, the way a host does."""
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PACK_NAME = "ShotStream"


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
