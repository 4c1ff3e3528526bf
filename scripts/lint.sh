#!/usr/bin/env bash
# Lint: ruff with pyproject.toml's settings (line length 110) over the repo, or over the paths given.
# scripts/test.sh (and so CI) runs it before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ruff check "${@:-.}"
