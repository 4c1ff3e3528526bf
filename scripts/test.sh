#!/usr/bin/env bash
# Quick start 2 (and CI): set up, then run the whole test suite. GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .  # the code style is part of the suite (pyproject.toml's settings)
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
