#!/usr/bin/env bash
# Quick start 1: set up, then fine-tune SmolLM2-135M-Instruct with MeZO-LoRA on Rotten Tomatoes, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/zoft demo "$@"
