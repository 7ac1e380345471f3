#!/usr/bin/env bash
# The main job of the README, offline: build the built-in default model (a real Qwen3 architecture with
# random weights and a working tokenizer), pull it into the store, run it, and compare load times with
# transformers' own from_pretrained on the same files.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh transformers
exec .venv/bin/flash demo "$@"
