#!/usr/bin/env bash
# Install (idempotent) and run the test suite; slow tests are excluded (-m slow: only them; -m "": all).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "not slow" -q "$@"
