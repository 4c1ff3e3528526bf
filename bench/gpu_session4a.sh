#!/usr/bin/env bash
# Fourth session, first device call (issue 3): the baseline before varlen attention. GPU tests, zoft bench
# (LoRA, bf16) on sst2 and multirc for opt-125m and opt-1.3b, and profiles with the top kernels.
set -u
export PYTHONPATH=$PWD:$PWD/.venv/lib/python3.11/site-packages HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p $OUT
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; lscpu | grep "Model name"
python -c "import torch, inspect; from torch.nn.attention.varlen import varlen_attn as v; print(torch.__version__, inspect.signature(v))"
timeout 150 python -m pytest -q -m gpu tests/ -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1; tail -3 $OUT/gpu_tests.txt
b(){ timeout 150 python -m zoft bench --dtype bfloat16 --device cuda "$@" >/tmp/o.txt 2>/tmp/e.txt; rc=$?; tail -1 /tmp/o.txt | tee -a $OUT/bench.jsonl; [ $rc = 0 ] || { echo "FAILED rc=$rc: $*"; tail -4 /tmp/e.txt; }; }
b --model opt-125m --workload sst2 --mode lora
b --model opt-1.3b --workload sst2 --mode lora
b --model opt-125m --workload multirc --mode lora
b --model opt-1.3b --workload multirc --mode lora --steps 10 --warmup 3
for m in "opt-1.3b sst2" "opt-125m multirc" "opt-125m sst2"; do set -- $m
  timeout 120 python bench/profile_step.py --model $1 --workload $2 > $OUT/profile_$1_$2.txt 2>&1; grep -E "pipelined|per step" $OUT/profile_$1_$2.txt
done
