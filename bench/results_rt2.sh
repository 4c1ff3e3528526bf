#!/usr/bin/env bash
# The Rotten Tomatoes runs that bench/results_rt.sh's first pass did not finish (MeZO-full, backprop-full),
# on this CPU. Same settings as results_rt.sh.
set -u
cd "$(dirname "$0")/.."
Z=.venv/bin/zoft
common="--model smollm2-135m-instruct --task rotten_tomatoes --n-train 1000 --n-dev 200 --n-test 500 --batch-size 16"
mkdir -p runs/results
for spec in \
  "mezo_full  --mode full --layers top4 --lr 1e-5 --eps 1e-3 --steps 900" \
  "bp_full    --optimizer adamw --mode full --layers top4 --lr 1e-5 --steps 300"; do
  set -- $spec; name=$1; shift
  rm -rf runs/results/$name
  /usr/bin/time -v $Z train $common "$@" --eval-every 300 --output-dir runs/results/$name \
    > runs/results/$name.json 2> runs/results/$name.log
done
