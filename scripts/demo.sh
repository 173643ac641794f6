#!/usr/bin/env bash
# The main job: install, start a real ComfyUI host with the pack, run the 5-shot story workflow on the
# bundled tiny model, write the mp4 and a contact sheet, stop the host, print where the files are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/run_story.py "$@"
