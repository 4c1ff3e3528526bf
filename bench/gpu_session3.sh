#!/usr/bin/env bash
# Third session's device call (issue 3): GPU tests, the profile after graphs + pipelining, zoft bench
# (synchronous and pipelined LoRA steps) and full rows vs in-place. Usage (device): bash bench/gpu_session3.sh
set -u
export PYTHONPATH=$PWD:$PWD/.venv/lib/python3.11/site-packages HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch,transformers,triton;print('torch',torch.__version__,'transformers',transformers.__version__,'triton',triton.__version__)"
mkdir -p $OUT
b(){ timeout 150 python -m zoft bench --dtype bfloat16 --device cuda "$@" >/tmp/o.txt 2>/tmp/e.txt; rc=$?; tail -1 /tmp/o.txt | tee -a $OUT/bench.jsonl; [ $rc = 0 ] || { echo "FAILED rc=$rc: $*"; grep -v ' ms$' /tmp/e.txt | tail -4; }; }
timeout 240 python -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -4
timeout 120 python bench/profile_step.py --model opt-125m --workload sst2 > $OUT/profile_opt125m.txt 2>&1; head -3 $OUT/profile_opt125m.txt
b --model opt-125m --workload sst2 --mode lora
b --model opt-1.3b --workload sst2 --mode lora
b --model opt-125m --workload multirc --mode lora
b --model smollm2-135m --workload sst2 --mode lora
timeout 100 python bench/full_rows_bench.py --model opt-125m --workload sst2 --layers top4 --device cuda 2>/dev/null | tail -1 | tee -a $OUT/bench.jsonl
timeout 100 python bench/full_rows_bench.py --model opt-1.3b --workload sst2 --layers top4 --device cuda 2>/dev/null | tail -1 | tee -a $OUT/bench.jsonl
b --model opt-1.3b --workload multirc --mode lora
