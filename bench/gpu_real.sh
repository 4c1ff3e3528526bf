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
mkdir -p /tmp/zx/logs; nvidia-smi --query-gpu=name --format=csv,noheader
run(){ name=$1; shift; mkdir -p /tmp/zx/logs; timeout ${RUN_LIMIT:-9999} /usr/bin/time -f "%e s wall, %M KB max RSS" \
  python -m zoft train --model $G --device cuda --task rotten_tomatoes --n-train 1000 --n-dev 200 --n-test 500 \
  --batch-size 16 --output-dir /tmp/zx/runs/$name --log-every 1000 "$@" > /tmp/zx/$name.json 2> /tmp/zx/logs/$name.txt;
  summary $name; }
summary(){ python -c "import json,sys;r=json.load(open('/tmp/zx/runs/$1/results.json'));d=[json.loads(l) for l in open('/tmp/zx/runs/$1/metrics.jsonl') if 'dev_' in l];print('$1', {k:r.get(k) for k in ('zero_shot_accuracy','best_dev_accuracy','final_accuracy','zero_shot_f1','best_dev_f1','final_f1','final_exact_match','seconds_per_step','peak_memory_mb')}, [(x['step'],x.get('dev_accuracy',x.get('dev_f1'))) for x in d])"; }
tails(){ for f in /tmp/zx/logs/$1*.txt; do echo "$(basename $f): $(tr '\r' '\n' < $f | grep -E 'step|train' | tail -1)"; done; }
collect(){ for d in /tmp/zx/runs/*/; do n=$(basename $d); mkdir -p $OUT/runs/$n; cp $d/results.json $d/metrics.jsonl $d/zoft_config.json $OUT/runs/$n/ 2>/dev/null; done; }
if [ "$1" = rt ]; then
  run mezo_lora_900 --mode lora --layers top4 --lr 5e-3 --eps 1e-2 --steps 900 --eval-every 300
  run bp_lora --optimizer adamw --mode lora --layers top4 --lr 1e-3 --steps 300 --eval-every 100 --no-zero-shot
  run mezo_lora_6k --mode lora --layers top4 --lr 5e-3 --eps 1e-2 --steps 6000 --eval-every 1000 --no-zero-shot
  run mezo_lora_6k_lr1e-2 --mode lora --layers top4 --lr 1e-2 --eps 1e-2 --steps 6000 --eval-every 1000 --no-zero-shot
  run mezo_lora_all_6k --mode lora --lr 5e-3 --eps 1e-2 --steps 6000 --eval-every 1000 --no-zero-shot
fi
if [ "$1" = sweep ]; then  # after the rt runs: constant lr 5e-3 diverges near step 2000
  z="--mode lora --layers top4 --eps 1e-2 --no-zero-shot"
  run lr2e-3_8k $z --lr 2e-3 --steps 8000 --eval-every 1000
  run lr5e-3_linear_6k $z --lr 5e-3 --schedule linear --steps 6000 --eval-every 1000
  run lr5e-3_guard_6k $z --lr 5e-3 --guard-threshold 2 --steps 6000 --eval-every 1000
  run lr5e-3_dir4_3k $z --lr 5e-3 --directions 4 --steps 3000 --eval-every 500
  run lr3e-3_cosine_10k $z --lr 3e-3 --schedule cosine --steps 10000 --eval-every 1000
fi
if [ "$1" = final ]; then  # the best sweep arm (cosine), longer, and a second seed of data order/z
  z="--mode lora --layers top4 --eps 1e-2"
  run cos3e-3_20k $z --lr 3e-3 --schedule cosine --steps 20000 --eval-every 2000
  run cos2e-3_20k_seed1 $z --lr 2e-3 --schedule cosine --steps 20000 --eval-every 2000 --seed 1 --no-zero-shot
fi
if [ "$1" = final2 ]; then  # 20k-step arms in parallel on one GPU (each process is launch-bound, the GPU mostly idle)
  export OMP_NUM_THREADS=2
  export RUN_LIMIT=540; python -m zoft eval --model $G --device cuda --task rotten_tomatoes --n-dev 200 --n-test 500 \
    > /tmp/zx/zs.json 2>/tmp/zx/logs/zero_shot.txt; echo "zero-shot: $(tail -1 /tmp/zx/zs.json)"  # also fills the cache
  z="--mode lora --eps 1e-2 --schedule cosine --steps 20000 --eval-every 2000 --no-zero-shot"
  run c3_top4_20k $z --layers top4 --lr 3e-3 &
  run c3_top4_20k_seed1 $z --layers top4 --lr 3e-3 --seed 1 &
  run c5_top4_20k $z --layers top4 --lr 5e-3 &
  run c3_top8_20k $z --layers top8 --lr 3e-3 &
  run c5_top4_dir2_20k $z --layers top4 --lr 5e-3 --directions 2 &
  run bp_lora_seed1 --optimizer adamw --mode lora --layers top4 --lr 1e-3 --steps 300 --eval-every 100 --no-zero-shot --seed 1 &
  wait
fi
if [ "$1" = final3 ]; then  # after final2 (every 20k arm collapsed once |g| grew): clipped g, lower lr
  export OMP_NUM_THREADS=2 RUN_LIMIT=560
  z="--mode lora --layers top4 --eps 1e-2 --schedule cosine --eval-every 2000 --no-zero-shot"
  G1=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))  # a second GPU takes two of the arms when there is one
  run c3_clip1_20k $z --lr 3e-3 --clip-grad 1 --steps 20000 &
  run c3_clip1_20k_seed1 $z --lr 3e-3 --clip-grad 1 --steps 20000 --seed 1 &
  run c3_clip05_20k $z --lr 3e-3 --clip-grad 0.5 --steps 20000 &
  CUDA_VISIBLE_DEVICES=$G1 run c15_20k $z --lr 1.5e-3 --steps 20000 &
  CUDA_VISIBLE_DEVICES=$G1 run c5_clip1_dir4_10k $z --lr 5e-3 --clip-grad 1 --directions 4 --steps 10000 --eval-every 1000 &
  wait
fi
if [ "$1" = final4 ]; then  # clipped g held (final3); its seed-0 arm lost to a cache race, now fixed
  export OMP_NUM_THREADS=2 RUN_LIMIT=230
  z="--mode lora --layers top4 --eps 1e-2 --schedule cosine --eval-every 2000 --no-zero-shot"
  G1=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
  run c3_clip1_20k $z --lr 3e-3 --clip-grad 1 --steps 20000 &
  run c5_clip1_20k $z --lr 5e-3 --clip-grad 1 --steps 20000 &
  CUDA_VISIBLE_DEVICES=$G1 run c3_clip1_30k $z --lr 3e-3 --clip-grad 1 --steps 30000 &
  CUDA_VISIBLE_DEVICES=$G1 run c3_clip05_20k $z --lr 3e-3 --clip-grad 0.5 --steps 20000 &
  wait
fi
if [ "$1" = final5 ]; then  # session 4, one H100: what closes the gap to backprop? (clip 1, lr 3e-3 cosine 20k = 0.805)
  export OMP_NUM_THREADS=3 RUN_LIMIT=320
  z="--mode lora --eps 1e-2 --schedule cosine --eval-every 2000 --no-zero-shot --clip-grad 1 --lr 3e-3 --steps 20000"
  run c3_clip1_eps3e-2 ${z/--eps 1e-2/--eps 3e-2} --layers top4 &
  run c3_clip1_eps1e-3 ${z/--eps 1e-2/--eps 1e-3} --layers top4 &
  run c3_clip1_top8 $z --layers top8 &
  run c3_clip1_b32 $z --layers top4 --batch-size 32 &
  wait
  collect
fi
if [ "$1" = final6 ]; then  # session 5: seeds 1 and 2 of the top-8 arm (final5's 0.834 was one seed), top 12,
  # and backprop-LoRA matched on this GPU (three seeds at top 8, one at top 12)
  export OMP_NUM_THREADS=3 RUN_LIMIT=470
  z="--mode lora --eps 1e-2 --schedule cosine --eval-every 2000 --no-zero-shot --clip-grad 1 --lr 3e-3 --steps 20000"
  bp="--optimizer adamw --mode lora --lr 1e-3 --steps 300 --eval-every 100 --no-zero-shot"
  run c3_clip1_top8_seed1 $z --layers top8 --seed 1 &
  run c3_clip1_top8_seed2 $z --layers top8 --seed 2 &
  run c3_clip1_top12 $z --layers top12 &
  (run bp_lora_top8 $bp --layers top8; run bp_lora_top8_seed2 $bp --layers top8 --seed 2; run bp_lora_top12 $bp --layers top12) &
  wait
  collect
fi
if [ "$1" = final7 ]; then  # right after final6 (top 12: MeZO 0.854 vs backprop 0.864, one seed each): seeds 1, 2
  export OMP_NUM_THREADS=3 RUN_LIMIT=470
  z="--mode lora --eps 1e-2 --schedule cosine --eval-every 2000 --no-zero-shot --clip-grad 1 --lr 3e-3 --steps 20000"
  bp="--optimizer adamw --mode lora --lr 1e-3 --steps 300 --eval-every 100 --no-zero-shot"
  run c3_clip1_top12_seed1 $z --layers top12 --seed 1 &
  run c3_clip1_top12_seed2 $z --layers top12 --seed 2 &
  (run bp_lora_top12_seed1 $bp --layers top12 --seed 1; run bp_lora_top12_seed2 $bp --layers top12 --seed 2) &
  wait
  collect
fi
if [ "$1" = final8 ]; then  # prepared, not run (next session): 16 blocks, three seeds a side (top 8: gap 3.3, top 12: 3.0)
  export OMP_NUM_THREADS=3 RUN_LIMIT=520
  z="--mode lora --eps 1e-2 --schedule cosine --eval-every 2000 --no-zero-shot --clip-grad 1 --lr 3e-3 --steps 20000"
  bp="--optimizer adamw --mode lora --lr 1e-3 --steps 300 --eval-every 100 --no-zero-shot"
  run c3_clip1_top16 $z --layers top16 &
  run c3_clip1_top16_seed1 $z --layers top16 --seed 1 &
  run c3_clip1_top16_seed2 $z --layers top16 --seed 2 &
  (for sd in 0 1 2; do run bp_lora_top16_seed$sd $bp --layers top16 --seed $sd; done) &
  wait
  collect
fi
if [ "$1" = final9 ]; then  # session 6: MeZO-LoRA's train loss stalls at 0.35-0.45 (backprop's: 0.08) while |g| grows to
  # the clip: z's part in directions the loss ignores is a random walk that grows ‖A‖, and ∇_B = G·Aᵀ grows with it.
  # Decoupled weight decay bounds the walk. Top 12, three decays on seed 0 and the middle one on seed 1.
  export OMP_NUM_THREADS=3 RUN_LIMIT=530
  z="--mode lora --layers top12 --eps 1e-2 --schedule cosine --eval-every 2000 --no-zero-shot --clip-grad 1 --lr 3e-3 --steps 20000"
  run c3_clip1_top12_wd0.1 $z --weight-decay 0.1 &
  run c3_clip1_top12_wd0.5 $z --weight-decay 0.5 &
  run c3_clip1_top12_wd2 $z --weight-decay 2 &
  run c3_clip1_top12_wd0.5_seed1 $z --weight-decay 0.5 --seed 1 &
  wait
  collect
fi
if [ "$1" = final10 ]; then  # session 6: weight decay hurt (final9). LoRA-FA instead: A frozen at init, so z has no
  # A part (top 12: 60% fewer coordinates) and ‖A‖ cannot grow; B's step in W is then ~‖A_init‖, so lr goes up
  export OMP_NUM_THREADS=3 RUN_LIMIT=530
  z="--mode lora --eps 1e-2 --schedule cosine --eval-every 2000 --no-zero-shot --clip-grad 1 --steps 20000 --lora-freeze-a"
  run fa_top12_lr1e-2 $z --layers top12 --lr 1e-2 &
  run fa_top12_lr3e-2 $z --layers top12 --lr 3e-2 &
  run fa_top12_lr1e-1 $z --layers top12 --lr 1e-1 &
  run fa_top16_lr3e-2 $z --layers top16 --lr 3e-2 &
  wait
  collect
fi
if [ "$1" = final11 ]; then  # after final10: LoRA-FA is stable (|g| ~0.15-0.3, no clip saturation, train loss 0.30-0.32
  # where both factors stall at 0.35-0.45); top 16 at lr 3e-2 peaked on dev (0.85) at step 2000, so a short schedule
  export OMP_NUM_THREADS=3 RUN_LIMIT=270
  z="--mode lora --eps 1e-2 --schedule cosine --eval-every 1000 --no-zero-shot --clip-grad 1 --steps 8000 --lora-freeze-a --layers top16 --lr 3e-2"
  run fa_top16_8k $z & run fa_top16_8k_seed1 $z --seed 1 & run fa_top16_8k_seed2 $z --seed 2 &
  wait
  collect
fi
if [ "$1" = final12 ] || [ "$1" = final12b ]; then  # prepared, not run (next session): at equal progress T·lr the
  # walk's variance T·lr²·E[g²] falls with lr, so lr 1e-3 for 60k steps (3× final7's progress budget at 1/3 the lr).
  # One call cannot hold 60k steps for three arms: final12 stops them with SIGTERM at RUN_LIMIT (each saves a
  # checkpoint), final12b, on the same warm machine, continues them with --resume; the backprop arms are final7's.
  export OMP_NUM_THREADS=3 RUN_LIMIT=540
  z="--mode lora --layers top12 --eps 1e-2 --schedule cosine --eval-every 5000 --no-zero-shot --clip-grad 1 --lr 1e-3 --steps 60000"
  [ "$1" = final12b ] && z="$z --resume"
  run c1_clip1_top12_60k $z & run c1_clip1_top12_60k_seed1 $z --seed 1 & run c1_clip1_top12_60k_seed2 $z --seed 2 &
  wait
  collect
fi
if [ "$1" = final13 ]; then  # prepared, not run: ZO's noise grows with the dimension d; rank 2 (α 4, the same α/r
  # as r 8 α 16) has a quarter of rank 8's coordinates. Top 12, 20k steps; compare with final6/final7's r 8 (0.828)
  export OMP_NUM_THREADS=3 RUN_LIMIT=540
  z="--mode lora --layers top12 --eps 1e-2 --schedule cosine --eval-every 2000 --no-zero-shot --clip-grad 1 --steps 20000 --lora-r 2 --lora-alpha 4"
  run r2_top12_lr3e-3 $z --lr 3e-3 & run r2_top12_lr1e-2 $z --lr 1e-2 & run r2_top12_lr1e-2_seed1 $z --lr 1e-2 --seed 1 &
  wait
  collect
fi
if [ "$1" = final14 ] || [ "$1" = final14b ]; then  # session 7, two GPUs: the walk's size grows as lr·√T while the
  # progress grows as lr·T, and top 12 at lr 3e-3 peaked on dev by step 2-4k. Two lower rates for 50k steps (cosine),
  # three seeds each, one rate per GPU. 150k steps a GPU do not fit one call: final14 stops the arms with SIGTERM at
  # RUN_LIMIT (each saves a checkpoint), final14b continues them with --resume on the same warm machine; the backprop
  # and lr 3e-3 arms are final6/final7's (same seeds, so the same train/dev draw and the same test set).
  export OMP_NUM_THREADS=3 RUN_LIMIT=${RUN_LIMIT:-550}
  z="--mode lora --layers top12 --eps 1e-2 --schedule cosine --eval-every 5000 --no-zero-shot --clip-grad 1 --steps 50000"
  [ "$1" = final14b ] && z="$z --resume"
  G1=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
  for sd in 0 1 2; do
    CUDA_VISIBLE_DEVICES=0 run c1_top12_50k_seed$sd $z --lr 1e-3 --seed $sd &
    CUDA_VISIBLE_DEVICES=$G1 run c05_top12_50k_seed$sd $z --lr 5e-4 --seed $sd &
  done
  wait
  tails
  # checkpoints and step logs too (a fresh machine can --resume from these), one tarball a rate: each must stay < 16 MiB
  (cd /tmp/zx && tar czf $OUT/state_c1.tgz runs/c1_* && tar czf $OUT/state_c05.tgz runs/c05_*)
fi
if [ "$1" = final15 ]; then  # after final14 (lr 1e-3, 50k: gap 0.9): the same recipe on MeZO's own sampling, 500 dev /
  # 1000 test (a different train/dev/test draw), one MeZO arm a GPU, backprop beside the second
  export OMP_NUM_THREADS=4 RUN_LIMIT=${RUN_LIMIT:-540}
  n="--n-dev 500 --n-test 1000"
  z="--mode lora --layers top12 --eps 1e-2 --schedule cosine --eval-every 5000 --no-zero-shot --clip-grad 1 --steps 50000 --lr 1e-3"
  bp="--optimizer adamw --mode lora --layers top12 --lr 1e-3 --steps 300 --eval-every 100"
  G1=$(( $(nvidia-smi -L | wc -l) > 1 ? 1 : 0 ))
  if [ "${SEED2:-}" = 1 ]; then  # the third seed, in a second call (one arm a GPU runs at 180 steps/s, three at 55)
    CUDA_VISIBLE_DEVICES=0 run m500_c1_top12_50k_seed2 $z $n --seed 2 &
    CUDA_VISIBLE_DEVICES=$G1 run m500_bp_top12_seed2 $bp $n --seed 2 --no-zero-shot &
  else
    CUDA_VISIBLE_DEVICES=0 run m500_c1_top12_50k_seed0 $z $n --seed 0 &
    CUDA_VISIBLE_DEVICES=$G1 run m500_c1_top12_50k_seed1 $z $n --seed 1 &
    (export CUDA_VISIBLE_DEVICES=$G1; run m500_bp_top12_seed0 $bp $n --seed 0; run m500_bp_top12_seed1 $bp $n --seed 1 --no-zero-shot) &
  fi
  wait
  tails m500
fi
if [ "$1" = squad ]; then
  # SQuAD v1.1 (BIG-bench copy, carried in .xfer/bigbench): generation, F1/EM
  mkdir -p $ZOFT_CACHE/bigbench && cp -r .xfer/bigbench/squad_shifts $ZOFT_CACHE/bigbench/
  q="--task squad --n-train 1000 --n-dev 200 --n-test 500 --eval-batch-size 32"
  python -m zoft eval --model $G --device cuda $q --icl-k 2 > /tmp/zx/squad_icl2.json 2>/tmp/zx/logs/squad_icl2.txt; echo "squad icl2: $(tail -1 /tmp/zx/squad_icl2.json)"
  runq(){ name=$1; shift; /usr/bin/time -f "%e s wall" python -m zoft train --model $G --device cuda $q --batch-size 16 \
    --output-dir /tmp/zx/runs/$name --log-every 1000 "$@" > /tmp/zx/$name.json 2> /tmp/zx/logs/$name.txt; summary $name; }
  runq squad_mezo_lora --mode lora --layers top4 --lr 3e-3 --eps 1e-2 --schedule cosine --steps 4000 --eval-every 1000
  runq squad_bp_lora --optimizer adamw --mode lora --layers top4 --lr 1e-3 --steps 300 --eval-every 100 --no-zero-shot
  runq squad_mezo_full --mode full --layers top4 --lr 1e-5 --eps 1e-3 --steps 4000 --eval-every 1000 --no-zero-shot
  runq squad_bp_full --optimizer adamw --mode full --layers top4 --lr 1e-5 --steps 300 --eval-every 100 --no-zero-shot
fi
# no step logs (50k lines a run put runs.tgz over the 16 MiB a returned file may hold; state_*.tgz carries them)
tar czf $OUT/runs.tgz -C /tmp/zx/runs --exclude=checkpoint --exclude=best --exclude=adapter --exclude=steps.jsonl . 2>/dev/null
tar czf $OUT/logs.tgz -C /tmp/zx logs 2>/dev/null
