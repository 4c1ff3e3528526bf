#!/usr/bin/env bash
# Fourth session, device calls 2-4 (issue 3; earlier versions of this file are in git history at fb8a5c2,
# 48d571d, 42a8a10): GPU tests, zoft bench (LoRA, bf16) on sst2 and multirc for three models, the memory
# bench with streamed blocks, and profiles of opt-125m multirc and opt-1.3b sst2.
set -u
export PYTHONPATH=$PWD:$PWD/.venv/lib/python3.11/site-packages HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python -m pytest -q -m gpu tests/ -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1; tail -4 $OUT/gpu_tests.txt
b(){ timeout 150 python -m zoft bench --dtype bfloat16 --device cuda "$@" >/tmp/o.txt 2>/tmp/e.txt; rc=$?; cat /tmp/e.txt >> $OUT/bench_stderr.txt; tail -1 /tmp/o.txt | tee -a $OUT/bench.jsonl | python -c "import json,sys; d=json.loads(sys.stdin.read()); print(d['model'], d['workload'], 'ref', d['reference_step_ms'], 'fwd', d['forward_ms'], 'zoft', d['zoft_step_ms'], 'sync', d['zoft_step_sync_ms'], 'x', d['speedup_vs_reference'], 'peak', d['zoft_peak_mb'], d['forward_peak_mb'])"; [ $rc = 0 ] || { echo "FAILED rc=$rc: $*"; tail -4 /tmp/e.txt; }; }
b --model opt-125m --workload sst2 --mode lora
b --model opt-1.3b --workload sst2 --mode lora
b --model smollm2-135m --workload sst2 --mode lora
b --model opt-125m --workload multirc --mode lora
b --model opt-1.3b --workload multirc --mode lora --steps 10 --warmup 3
b --model smollm2-135m --workload multirc --mode lora
timeout 90 python bench/memory_bench.py --preset smollm2-135m --device cuda --dtype float32 --prompt 10-60 > $OUT/memory.txt 2>&1; grep "^|" $OUT/memory.txt

for m in "opt-125m multirc" "opt-1.3b sst2"; do set -- $m
  timeout 120 python bench/profile_step.py --model $1 --workload $2 > $OUT/profile_$1_$2.txt 2>&1; grep -E "pipelined|per step" $OUT/profile_$1_$2.txt
done
