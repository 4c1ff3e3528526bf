#!/usr/bin/env bash
# Issue 4's real-model results on Rotten Tomatoes: SmolLM2-135M-Instruct (real weights), on this CPU.
# Usage: bash bench/results_rt.sh [NAME...]  (default: the first five; names: icl8 mezo_lora mezo_full bp_lora bp_full bp_lora_top8)
# Each run writes runs/results/NAME; the summary is collected into docs/results.md by hand from results.json.
set -u
cd "$(dirname "$0")/.."
Z=.venv/bin/zoft
common="--model smollm2-135m-instruct --task rotten_tomatoes --n-train 1000 --n-dev 200 --n-test 500 --batch-size 16"
want="${*:-icl8 mezo_lora mezo_full bp_lora bp_full}"
mkdir -p runs/results
if [[ " $want " == *" icl8 "* ]]; then
  $Z eval --model smollm2-135m-instruct --task rotten_tomatoes --n-test 500 --icl-k 8 > runs/results/icl8.json 2> runs/results/icl8.log
fi
for spec in \
  "mezo_lora  --mode lora --layers top4 --lr 5e-3 --eps 1e-2 --steps 900" \
  "mezo_full  --mode full --layers top4 --lr 1e-5 --eps 1e-3 --steps 900" \
  "bp_lora    --optimizer adamw --mode lora --layers top4 --lr 1e-3 --steps 300" \
  "bp_lora_top8 --optimizer adamw --mode lora --layers top8 --lr 1e-3 --steps 300" \
  "bp_full    --optimizer adamw --mode full --layers top4 --lr 1e-5 --steps 300"; do
  set -- $spec; name=$1; shift
  [[ " $want " == *" $name "* ]] || continue
  rm -rf runs/results/$name
  /usr/bin/time -v $Z train $common "$@" --eval-every 300 --output-dir runs/results/$name \
    > runs/results/$name.json 2> runs/results/$name.log
done
