"""The repo root is a ComfyUI pack (it has __init__.py); collect it as a plain folder, not a package,
so pytest never imports the ComfyUI entry point as a side effect of running the tests."""
from pathlib import Path

import pytest

ROOT = Path(__file__).parent


def pytest_collect_directory(path, parent):
    if path == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None


def pytest_configure(config):
    # The test models are tiny: one thread avoids oversubscribing a small shared CPU (much faster here).
    import torch

    torch.set_num_threads(1)
