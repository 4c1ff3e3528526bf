"""Data-parallel ZO throughput: examples per second of zoft's training step on 1 or N GPUs (torchrun).

What is timed is the step `zoft train` runs, unchanged: ``zoft.train.step_losses`` (this rank's shard of
the batch through the ±ε LoRA rows in one forward, then the all-reduce of per-row loss sums and the
example count from ``zoft.distributed``) followed by ``zoft.zo.sgd_update_``. The global batch is fixed
(``--global-batch``, default 32), so N ranks each take 32/N examples: the question is how much faster
the same optimisation runs on two GPUs, not how much more data they can see. A step's time is the
slowest rank's (per-step max over ranks), measured between a barrier and ``torch.cuda.synchronize``;
the result is the median over ``--steps`` after ``--warmup``. examples/s = global batch / step time.
The same steps are then run as ``zoft train`` pipelines them (next batch packed during the step, the
update queued with g on the device, the losses read one step later; no barrier or synchronize between
steps): ``step_ms_pipelined`` is that window's time over the slowest rank / --steps.
Two parts of a step are also timed alone on rank 0, to say where the time goes: building the shard's
packed batch on the CPU (``batch_build_ms``) and one all-reduce of the step's three scalars
(``allreduce_ms``).

Model: the shapes of a published OPT (``zoft.models.opt.PRESETS``; default opt-1.3b) with random weights
built on the device (``load_session(..., random_weights=True)`` on a temporary folder holding only the
config and a stub tokenizer; the same seed on every rank), LoRA r=8, α=16 on q and v, one direction.
Batches: synthetic token ids of the workloads of ``zoft bench`` (``zoft.bench.harness.WORKLOADS``): sst2 (prompts
of 10–60 tokens, two one-token candidates) and multirc (prompts of 350–450 tokens, candidates of 1–3).

    # one GPU, then two (a 2×H100 host), both workloads, then the speed-up table. OMP_NUM_THREADS is
    # set for both: torchrun sets it to 1 only when it starts more than one process, which would give
    # the two-GPU runs a single-threaded CPU side (batch packing) and the one-GPU runs not.
    export PYTHONPATH=$PWD OMP_NUM_THREADS=8; rm -f /tmp/dp.jsonl; for w in sst2 multirc; do for n in 1 2; do
      python3 -m torch.distributed.run --standalone --nproc-per-node $n bench/dp_bench.py --workload $w \
        --preset opt-1.3b --dtype bfloat16 --device cuda --json-out /tmp/dp.jsonl; done; done
    python3 bench/dp_bench.py --summarize /tmp/dp.jsonl

    # smoke test on a CPU (two gloo processes, tiny shapes):
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 bench/dp_bench.py \
        --preset tiny --device cpu --dtype float32 --steps 3 --warmup 1

Rank 0 prints a table, then one JSON line (also appended to --json-out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from zoft import distributed as dist
from zoft.bench.harness import WORKLOADS, make_batch, write_stub_tokenizer
from zoft.config import ModelConfig, ZOConfig
from zoft.models.opt import PRESETS
from zoft.session import attach, load_session, make_engine
from zoft.train.pipeline import HostCopy, pipelines, snapshot
from zoft.train.step import gather_directions, step_losses
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import sgd_update_

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
            vocab_size=1024, max_position_embeddings=512)


def opt_config(preset: str) -> dict:
    """A Hugging Face OPT config.json of the preset's shapes."""
    shape = TINY if preset == "tiny" else PRESETS[preset]
    cfg = dict(model_type="opt", vocab_size=50272, max_position_embeddings=2048, pad_token_id=1, bos_token_id=2,
               eos_token_id=2, dropout=0.0, activation_function="relu", do_layer_norm_before=True)
    cfg |= shape
    cfg.setdefault("word_embed_proj_dim", cfg["hidden_size"])
    return cfg


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def pipelined(args, s, engine, shards, zc: ZOConfig, n_dirs: int, n: int) -> float:
    """Seconds a step over the timed window, pipelined as zoft train runs it (the slowest rank's)."""
    eps, lr = zc.eps_value, zc.lr_value
    ahead, pending = {}, None
    dist.barrier()
    sync(str(s.device))
    t0 = time.perf_counter()
    for i in range(args.warmup, n):
        seeds = direction_seeds(args.seed, i, n_dirs)
        lp, lm, g = step_losses(engine, s, shards[i], "candidate", seeds, eps, packed=ahead.pop("packed", None),
                                next_batch=shards[i + 1] if i + 1 < n else None, ahead=ahead, lazy=True)
        snapshot(s)
        sgd_update_(s.trainable, seeds, g, lr, zc.weight_decay)
        nxt = HostCopy(torch.cat([lp, lm, g]))
        if pending is not None:
            pending.read()
        pending = nxt
    pending.read()
    sync(str(s.device))
    return float(dist.all_reduce_max(torch.tensor([time.perf_counter() - t0], dtype=torch.float64))[0]) / args.steps


def run(args: argparse.Namespace) -> dict | None:
    rank, world = dist.world()
    if args.per_rank_batch:  # weak scaling: each rank's batch fixed, the global batch grows with the ranks
        args.global_batch = args.per_rank_batch * world
    spread = args.spread_directions and world > 1
    if args.global_batch % world and not spread:
        raise SystemExit(f"--global-batch {args.global_batch} does not split evenly over {world} ranks")
    device = dist.local_device(args.device)
    cfg = opt_config(args.preset)
    with tempfile.TemporaryDirectory(prefix="dp-bench-") as folder:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f)
        write_stub_tokenizer(folder)
        torch.manual_seed(args.seed)  # the same random weights on every rank
        s = load_session(ModelConfig(model=folder, device=device, dtype=args.dtype), random_weights=True)
    zc = ZOConfig(mode=args.mode, batch_size=args.global_batch, directions=args.directions,
                  spread_directions=args.spread_directions)
    attach(s, zc, args.seed)
    engine = make_engine(s)
    eps, lr = zc.eps_value, zc.lr_value
    n_dirs = zc.directions * (world if spread else 1)  # the step's directions, all ranks together

    w = WORKLOADS[args.workload]
    n = args.warmup + args.steps
    batches = [make_batch(w, args.global_batch, cfg["vocab_size"], cfg["bos_token_id"], args.seed * 100003 + i)
               for i in range(n)]  # the same global batch on every rank; each takes indices[rank::world]
    # spread: every rank the whole batch, on its own share of the step's directions (zoft train's estimate)
    shards = batches if spread else [[b[j] for j in dist.shard(list(range(len(b))), rank, world)] for b in batches]

    def sync_step(i: int) -> None:
        seeds = direction_seeds(args.seed, i, n_dirs)
        if spread:
            lp, lm, grads = step_losses(engine, s, shards[i], "candidate", seeds[rank::world], eps, reduce=False)
            _, _, grads = gather_directions(seeds, lp, lm, grads, zc.directions, world)
        else:
            _, _, grads = step_losses(engine, s, shards[i], "candidate", seeds, eps)
        sgd_update_(s.trainable, seeds, grads, lr, zc.weight_decay)

    times = []
    for i in range(n):
        dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        sync_step(i)
        sync(device)
        times.append(time.perf_counter() - t0)
        if rank == 0:
            print(f"step {i + 1}/{n}{' (warm-up)' if i < args.warmup else ''}: {times[-1] * 1e3:.1f} ms "
                  f"on rank 0", file=sys.stderr, flush=True)
    slowest = dist.all_reduce_max(torch.tensor(times, dtype=torch.float64))[args.warmup :].tolist()

    # the train loop's pipeline (zoft.train.loop): batch i+1 packed during step i, the update queued with g on
    # the device, step i's losses read once step i+1 is queued; time of the whole window / steps. zoft train
    # runs --spread-directions (g gathered on the host) and full mode's in-place steps synchronously: no figure.
    piped = pipelined(args, s, engine, shards, zc, n_dirs, n) if pipelines(s) and not spread else None

    build = []  # what of a step is the CPU's: packing this rank's shard, masks, the copy to the device
    build = []  # what of a step is the CPU's: packing this rank's shard, masks, the copy to the device
    for shard in shards[args.warmup :]:
        sync(device)
        t0 = time.perf_counter()
        engine.batch(shard)
        sync(device)
        build.append(time.perf_counter() - t0)
    reduce = []  # the collective a step adds: one all-reduce of 3 float64 (L+, L-, count)
    for _ in range(args.steps):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce_sum(torch.zeros(3, device=device))
        sync(device)
        reduce.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    peak = float(dist.all_reduce_max(torch.tensor([peak]))[0])
    if rank != 0:
        return None
    step_s = statistics.median(slowest)
    tokens = sum(len(e.prompt_ids) + sum(map(len, e.cand_ids)) for b in batches[args.warmup :] for e in b)
    return {
        "bench": "dp", "preset": args.preset, "workload": args.workload, "dtype": args.dtype, "mode": args.mode,
        "scaling": "spread" if spread else ("weak" if args.per_rank_batch else "strong"),
        "directions": n_dirs, "spread_directions": spread,
        "world_size": world, "global_batch": args.global_batch,
        "per_rank_batch": args.global_batch if spread else args.global_batch // world,
        "steps": args.steps, "step_ms": round(step_s * 1e3, 3),
        "step_ms_min": round(min(slowest) * 1e3, 3), "step_ms_max": round(max(slowest) * 1e3, 3),
        "batch_build_ms": round(statistics.median(build) * 1e3, 3),
        "allreduce_ms": round(statistics.median(reduce) * 1e3, 3) if world > 1 else 0.0,
        "examples_per_second": round(args.global_batch / step_s, 2),
        "step_ms_pipelined": round(piped * 1e3, 3) if piped else None,
        "examples_per_second_pipelined": round(args.global_batch / piped, 2) if piped else None,
        "steps_per_second": round(1 / step_s, 2),
        "tokens_per_second": round(tokens / args.steps / step_s, 1),
        "peak_mb_per_rank": round(peak, 1) if device.startswith("cuda") else None,
        "trainable": s.trainable.numel(), "path": s.path,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
    }


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def baseline_key(r: dict) -> tuple:
    """What a run is compared with: the one-GPU run of the same model, workload, dtype and mode that does the
    same work a step. Strong scaling: the same global batch. Weak: the same per-rank batch (one GPU's batch).
    Spread directions: the same global batch and all the step's directions on one GPU."""
    kind = r.get("scaling", "strong")
    work = (r["global_batch"], r.get("directions", 1)) if kind in ("strong", "spread") else (r["per_rank_batch"],
                                                                                            r.get("directions", 1))
    return (r["preset"], r["workload"], r["dtype"], r.get("mode", "lora"), "weak" if kind == "weak" else "strong",
            *work)


def summarize(path: str) -> None:
    """Speed-up of each run over its one-GPU baseline (baseline_key), from --json-out lines. Weak scaling:
    examples per second (the work grows with the GPUs); strong and spread: steps per second (the same work)."""
    with open(path) as f:
        results = [json.loads(line) for line in f if line.strip()]
    base = {baseline_key(r): r for r in results if r["world_size"] == 1}
    print(f"{'preset':<9} {'workload':<8} {'mode':<5} {'scaling':<7} {'dirs':>4} {'GPUs':>4} {'batch':>6} "
          f"{'step ms':>9} {'ex/s':>9} {'speed-up':>8} {'pipelined ms':>13} {'speed-up':>8}")
    out = []
    for r in results:
        b = base.get(baseline_key(r))
        speedup = round(r["examples_per_second"] / b["examples_per_second"], 3) if b else None
        if b and r.get("scaling") == "spread":
            speedup = round(b["step_ms"] / r["step_ms"], 3)
        piped = (round(r["examples_per_second_pipelined"] / b["examples_per_second_pipelined"], 3)
                 if b and r.get("step_ms_pipelined") and b.get("step_ms_pipelined") else None)
        print(f"{r['preset']:<9} {r['workload']:<8} {r.get('mode', 'lora'):<5} {r.get('scaling', 'strong'):<7} "
              f"{r.get('directions', 1):>4} {r['world_size']:>4} {r['global_batch']:>6} {r['step_ms']:>9.1f} "
              f"{r['examples_per_second']:>9.1f} {speedup if speedup is not None else '-':>8} "
              f"{r.get('step_ms_pipelined') or float('nan'):>13.1f} {piped if piped is not None else '-':>8}")
        out.append({k: r.get(k) for k in ("preset", "workload", "dtype", "mode", "scaling", "directions",
                                          "world_size", "global_batch", "step_ms", "examples_per_second",
                                          "step_ms_pipelined", "device_name")}
                   | {"speedup": speedup, "speedup_pipelined": piped})
    print(json.dumps({"bench": "dp_summary", "results": out}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="opt-1.3b", choices=sorted(PRESETS) + ["tiny"])
    p.add_argument("--workload", default="sst2", choices=sorted(WORKLOADS))
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda", help="cuda (each rank takes the GPU of its LOCAL_RANK) or cpu")
    p.add_argument("--global-batch", type=int, default=32, help="examples per step, split over the ranks "
                   "(strong scaling)")
    p.add_argument("--per-rank-batch", type=int, default=0, help="weak scaling: each rank's examples per step "
                   "(the global batch is this × ranks); 0: --global-batch")
    p.add_argument("--mode", default="lora", choices=["lora", "full"], help="LoRA r=8 on q/v, or every parameter")
    p.add_argument("--directions", type=int, default=1, help="directions a step (each rank's, with "
                   "--spread-directions)")
    p.add_argument("--spread-directions", action="store_true", help="every rank takes the whole batch and its own "
                   "--directions (compare with one GPU at directions × ranks)")
    p.add_argument("--steps", type=int, default=50, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", default="", help="also append the JSON line to this file")
    p.add_argument("--summarize", default="", metavar="FILE", help="print the speed-up table of FILE's runs; no run")
    args = p.parse_args()
    if args.summarize:
        return summarize(args.summarize)
    result = run(args)
    if result is not None:
        print(table([(k, str(v)) for k, v in result.items()]))
        print(json.dumps(result), flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(result) + "\n")
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
