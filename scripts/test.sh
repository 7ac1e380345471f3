#!/usr/bin/env bash
# The test command of the README and of CI: set up .venv, then run the whole suite (GPU tests skip
# themselves without CUDA). Exits non-zero when any test fails or when no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/python -m pytest -q "$@"
