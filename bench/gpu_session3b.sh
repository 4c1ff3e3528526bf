#!/usr/bin/env bash
# Third session, second device call, on a 2-GPU host (issues 3 and 5): leaves the first GGUF part in
# /tmp/zx for the real-weight call that follows (bench/gpu_real.sh), runs the GPU tests, zoft bench
# (synchronous and pipelined LoRA steps) and the profile on GPU 0, then data parallel on 1 and 2 GPUs.
set -u
export PYTHONPATH=$PWD:$PWD/.venv/lib/python3.11/site-packages HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p /tmp/zx $OUT && cp .xfer/smol.gguf.part00 /tmp/zx/ &
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python -m pytest -q -m gpu tests/ -p no:cacheprovider > $OUT/gpu_tests.txt 2>&1; tail -3 $OUT/gpu_tests.txt
b(){ CUDA_VISIBLE_DEVICES=0 timeout 120 python -m zoft bench --dtype bfloat16 --device cuda "$@" >/tmp/o.txt 2>/tmp/e.txt; rc=$?; tail -1 /tmp/o.txt | tee -a $OUT/bench.jsonl; grep "note:" /tmp/e.txt; [ $rc = 0 ] || { echo "FAILED rc=$rc: $*"; grep -v ' ms$' /tmp/e.txt | tail -4; }; }
b --model opt-125m --workload sst2 --mode lora
b --model opt-1.3b --workload sst2 --mode lora
b --model smollm2-135m --workload sst2 --mode lora
CUDA_VISIBLE_DEVICES=0 timeout 90 python bench/profile_step.py --model opt-125m --workload sst2 > $OUT/profile_opt125m.txt 2>&1; grep -E "pipelined|per step|graphs:" $OUT/profile_opt125m.txt
export OMP_NUM_THREADS=8; rm -f /tmp/dp.jsonl
for w in sst2 multirc; do for n in 1 2; do
  timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node $n bench/dp_bench.py --workload $w \
    --preset opt-1.3b --dtype bfloat16 --device cuda --json-out /tmp/dp.jsonl > /tmp/dp_$w$n.txt 2>&1 || tail -5 /tmp/dp_$w$n.txt
done; done
python3 bench/dp_bench.py --summarize /tmp/dp.jsonl | tee $OUT/dp_summary.txt; cp /tmp/dp.jsonl $OUT/dp.jsonl
wait; ls -la /tmp/zx
