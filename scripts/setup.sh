#!/usr/bin/env bash
# Create .venv (once) and install flashtensors into it with the given extras. Idempotent and offline-safe
# once done: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  # --system-site-packages lets a GPU machine reuse its own CUDA torch instead of downloading another.
  "$py" -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q -r requirements/cpu.txt
fi
.venv/bin/python -m pip install -q -e ".[${extras}]"
