#!/usr/bin/env bash
# Install (idempotent) and run the test suite; slow tests are excluded (run them with: -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -m "not slow" -q "$@"
