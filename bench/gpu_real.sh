#!/usr/bin/env bash
# Real-weight SmolLM2-135M-Instruct runs on the GPU machine (issue 4). The 98 MB GGUF exceeds one
# transfer (64 MiB), so it travels in two parts (split -b 50000000 into .xfer/), the first left in
# /tmp/zx by an earlier call on the same warm machine; the sha256 is checked before use.
# Usage (device): bash bench/gpu_real.sh rt|squad   (writes $OUT/NAME/{metrics.jsonl,results.json,...})
set -u
export PYTHONPATH=$PWD:$PWD/.venv/lib/python3.11/site-packages HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export ZOFT_CACHE=/tmp/zx/cache
G=/tmp/zx/smol.gguf
if [ ! -f $G ]; then
  cat /tmp/zx/smol.gguf.part00 .xfer/smol.gguf.part01 > $G
fi
echo "$(cut -d' ' -f1 .xfer/sha)  $G" | sha256sum -c - || exit 3
nvidia-smi --query-gpu=name --format=csv,noheader
run(){ name=$1; shift; mkdir -p $OUT/$name; /usr/bin/time -f "%e s wall, %M KB max RSS" \
  python -m zoft train --model $G --device cuda --task rotten_tomatoes --n-train 1000 --n-dev 200 --n-test 500 \
  --batch-size 16 --output-dir /tmp/zx/runs/$name --log-every 1000 "$@" > $OUT/$name/stdout.json 2> $OUT/$name/log.txt;
  cp /tmp/zx/runs/$name/{metrics.jsonl,results.json,config.json} $OUT/$name/ 2>/dev/null;
  echo "$name: $(tail -c 400 $OUT/$name/stdout.json)"; grep -a "wall" $OUT/$name/log.txt | tail -1; }
if [ "$1" = rt ]; then
  run mezo_lora_900 --mode lora --layers top4 --lr 5e-3 --eps 1e-2 --steps 900 --eval-every 300
  run bp_lora --optimizer adamw --mode lora --layers top4 --lr 1e-3 --steps 300 --eval-every 100 --no-zero-shot
  run mezo_lora_6k --mode lora --layers top4 --lr 5e-3 --eps 1e-2 --steps 6000 --eval-every 1000 --no-zero-shot
  run mezo_lora_6k_lr1e-2 --mode lora --layers top4 --lr 1e-2 --eps 1e-2 --steps 6000 --eval-every 1000 --no-zero-shot
  run mezo_lora_all_6k --mode lora --lr 5e-3 --eps 1e-2 --steps 6000 --eval-every 1000 --no-zero-shot
fi
