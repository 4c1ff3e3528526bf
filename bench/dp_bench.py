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
from zoft.train.pipeline import HostCopy, snapshot
from zoft.train.step import step_losses
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


def run(args: argparse.Namespace) -> dict | None:
    rank, world = dist.world()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not split evenly over {world} ranks")
    device = dist.local_device(args.device)
    cfg = opt_config(args.preset)
    with tempfile.TemporaryDirectory(prefix="dp-bench-") as folder:
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(cfg, f)
        write_stub_tokenizer(folder)
        torch.manual_seed(args.seed)  # the same random weights on every rank
        s = load_session(ModelConfig(model=folder, device=device, dtype=args.dtype), random_weights=True)
    zc = ZOConfig(mode="lora", batch_size=args.global_batch)
    attach(s, zc, args.seed)
    engine = make_engine(s)
    eps, lr = zc.eps_value, zc.lr_value

    w = WORKLOADS[args.workload]
    n = args.warmup + args.steps
    batches = [make_batch(w, args.global_batch, cfg["vocab_size"], cfg["bos_token_id"], args.seed * 100003 + i)
               for i in range(n)]  # the same global batch on every rank; each takes indices[rank::world]
    shards = [[b[j] for j in dist.shard(list(range(len(b))), rank, world)] for b in batches]

    times = []
    for i in range(n):
        dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        seeds = direction_seeds(args.seed, i, zc.directions)
        _, _, grads = step_losses(engine, s, shards[i], "candidate", seeds, eps)
        sgd_update_(s.trainable, seeds, grads, lr, zc.weight_decay)
        sync(device)
        times.append(time.perf_counter() - t0)
        if rank == 0:
            print(f"step {i + 1}/{n}{' (warm-up)' if i < args.warmup else ''}: {times[-1] * 1e3:.1f} ms "
                  f"on rank 0", file=sys.stderr, flush=True)
    slowest = dist.all_reduce_max(torch.tensor(times, dtype=torch.float64))[args.warmup :].tolist()

    # the train loop's pipeline (zoft.train.loop): batch i+1 packed during step i, the update queued with g on
    # the device, step i's losses read once step i+1 is queued; time of the whole window / steps
    ahead, pending = {}, None
    dist.barrier()
    sync(device)
    t0 = time.perf_counter()
    for i in range(args.warmup, n):
        seeds = direction_seeds(args.seed, i, zc.directions)
        lp, lm, g = step_losses(engine, s, shards[i], "candidate", seeds, eps, packed=ahead.pop("packed", None),
                                next_batch=shards[i + 1] if i + 1 < n else None, ahead=ahead, lazy=True)
        snapshot(s)
        sgd_update_(s.trainable, seeds, g, lr, zc.weight_decay)
        nxt = HostCopy(torch.cat([lp, lm, g]))
        if pending is not None:
            pending.read()
        pending = nxt
    pending.read()
    sync(device)
    piped = float(dist.all_reduce_max(torch.tensor([time.perf_counter() - t0], dtype=torch.float64))[0]) / args.steps

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
        "bench": "dp", "preset": args.preset, "workload": args.workload, "dtype": args.dtype,
        "world_size": world, "global_batch": args.global_batch, "per_rank_batch": args.global_batch // world,
        "steps": args.steps, "step_ms": round(step_s * 1e3, 3),
        "step_ms_min": round(min(slowest) * 1e3, 3), "step_ms_max": round(max(slowest) * 1e3, 3),
        "batch_build_ms": round(statistics.median(build) * 1e3, 3),
        "allreduce_ms": round(statistics.median(reduce) * 1e3, 3) if world > 1 else 0.0,
        "examples_per_second": round(args.global_batch / step_s, 2),
        "step_ms_pipelined": round(piped * 1e3, 3),
        "examples_per_second_pipelined": round(args.global_batch / piped, 2),
        "tokens_per_second": round(tokens / args.steps / step_s, 1),
        "peak_mb_per_rank": round(peak, 1) if device.startswith("cuda") else None,
        "trainable": s.trainable.numel(), "path": s.path,
        "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
    }


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def summarize(path: str) -> None:
    """Speed-up of each (preset, workload, dtype) over its world_size-1 run, from --json-out lines."""
    with open(path) as f:
        results = [json.loads(line) for line in f if line.strip()]
    base = {(r["preset"], r["workload"], r["dtype"]): r for r in results if r["world_size"] == 1}
    print(f"{'preset':<10} {'workload':<8} {'dtype':<9} {'GPUs':>4} {'step ms':>9} {'ex/s':>8} {'speed-up':>8}"
          f" {'pipelined ms':>13} {'ex/s':>8} {'speed-up':>8}")
    out = []
    for r in results:
        b = base.get((r["preset"], r["workload"], r["dtype"]))
        speedup = round(r["examples_per_second"] / b["examples_per_second"], 3) if b else None
        piped = (round(r["examples_per_second_pipelined"] / b["examples_per_second_pipelined"], 3)
                 if b and "step_ms_pipelined" in r and "step_ms_pipelined" in b else None)
        print(f"{r['preset']:<10} {r['workload']:<8} {r['dtype']:<9} {r['world_size']:>4} {r['step_ms']:>9.1f} "
              f"{r['examples_per_second']:>8.1f} {speedup if speedup is not None else '-':>8}"
              f" {r.get('step_ms_pipelined', float('nan')):>13.1f} {r.get('examples_per_second_pipelined', float('nan')):>8.1f}"
              f" {piped if piped is not None else '-':>8}")
        out.append({k: r[k] for k in ("preset", "workload", "dtype", "world_size", "step_ms", "examples_per_second")}
                   | {"speedup": speedup, "speedup_pipelined": piped, "step_ms_pipelined": r.get("step_ms_pipelined"),
                      "device_name": r["device_name"]})
    print(json.dumps({"bench": "dp_summary", "results": out}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="opt-1.3b", choices=sorted(PRESETS) + ["tiny"])
    p.add_argument("--workload", default="sst2", choices=sorted(WORKLOADS))
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda", help="cuda (each rank takes the GPU of its LOCAL_RANK) or cpu")
    p.add_argument("--global-batch", type=int, default=32, help="examples per step, split over the ranks")
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
