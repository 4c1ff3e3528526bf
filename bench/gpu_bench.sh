#!/usr/bin/env bash
# Device call for issue 3/4 numbers. Usage: bash bench/gpu_bench.sh small|large
set -u
export PYTHONPATH=$PWD:$PWD/.venv/lib/python3.11/site-packages HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch,transformers,triton;print('torch',torch.__version__,'transformers',transformers.__version__,'triton',triton.__version__)"
b(){ timeout 150 python -m zoft bench --dtype bfloat16 --device cuda "$@" >/tmp/o.txt 2>/tmp/e.txt; rc=$?; tail -1 /tmp/o.txt; [ $rc = 0 ] || { echo "FAILED rc=$rc: $*"; grep -v ' ms$' /tmp/e.txt | tail -4; }; }
if [ "$1" = small ]; then
  timeout 200 python -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -6
  for w in sst2 multirc; do for mode in lora full; do b --model opt-125m --workload $w --mode $mode; done; done
  for w in sst2 multirc; do b --model smollm2-135m --workload $w --mode lora; done
  timeout 120 python bench/memory_bench.py --preset smollm2-135m --device cuda --dtype float32 2>&1 | tail -4
else
  for w in sst2 multirc; do for mode in lora full; do b --model opt-1.3b --workload $w --mode $mode; done; done
  b --model smollm2-135m --workload sst2 --mode full
  timeout 120 python bench/memory_bench.py --preset smollm2-135m --device cuda --dtype float32 --prompt 350-450 2>&1 | tail -4
fi
