"""Layer streaming benchmark: a ZO-LoRA step on a model whose weights stay in CPU memory.

Measures, in one run: (1) the bus floor, the time to copy every block's frozen weights host→GPU once
from pinned memory; (2) zoft's streamed step (both ±ε rows through each block while it is on the GPU);
(3) the peak GPU memory of that step. Random weights of the real shapes (no checkpoint needed).

    python bench/offload_bench.py --preset opt-13b --dtype bfloat16 --device cuda     # the issue's target
    python bench/offload_bench.py --preset tiny --device cpu --steps 2                 # smoke test here

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from zoft.engine.native import NativeEngine
from zoft.engine.offload import offload_to_host, stream_blocks
from zoft.lora import LoraArgs, inject_lora
from zoft.models.opt import OPT, PRESETS, OPTArgs
from zoft.tasks.encode import Encoded
from zoft.train.losses import row_losses
from zoft.zo.trainable import direction_seeds, lora_trainable, rows_step
from zoft.zo.update import sgd_update_

PRESETS = PRESETS | {"tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, ffn_dim=256,
                                  word_embed_proj_dim=64)}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def sst2_batch(n=16, seed=0, vocab=50000):
    r = random.Random(seed)
    return [Encoded([2] + [r.randrange(3, vocab) for _ in range(r.randint(10, 60))], [[r.randrange(3, vocab)],
                    [r.randrange(3, vocab)]], r.randrange(2), "mc") for _ in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="opt-13b", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    args = OPTArgs(**PRESETS[a.preset])
    t0 = time.time()
    with torch.device("meta"):
        model = OPT(args)
    model = model.to(dtype).to_empty(device="cpu")
    for p in model.parameters():  # random weights of the real shapes
        p.data.uniform_(-0.02, 0.02) if p.dim() > 1 else p.data.fill_(1.0)
    loras = inject_lora(model, model.block_prefix, ["q_proj", "v_proj"], None, LoraArgs())
    for m in loras.values():  # trained: on the device before the streamer takes the rest of the blocks
        m.lora_A.data, m.lora_B.data = m.lora_A.data.to(dev), m.lora_B.data.to(dev)
    offload_to_host(model, dev)
    streamer = stream_blocks(model, dev)  # as zoft --offload cpu: blocks and vocabulary stay on the host
    build_s = time.time() - t0

    # (1) the floor: every frozen block weight across the bus once, pinned, back to back
    floors = []
    for _ in range(3):
        sync(dev)
        t = time.time()
        for items in streamer.host:
            for _, h in items:
                h.to(dev, non_blocking=True)
        sync(dev)
        floors.append(time.time() - t)
    floor = min(floors)

    engine = NativeEngine(model, 0, 0, 1024, streamer)
    tr = lora_trainable(loras)
    batch = engine.batch(sst2_batch(vocab=args.vocab_size - 1))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for step in range(a.steps + 1):
        sync(dev)
        t = time.time()
        seeds = direction_seeds(0, step, 1)
        _, _, g = rows_step(lambda rows: row_losses(engine.scores(batch, rows, True), batch, "candidate"),
                            loras, seeds, 1e-2)
        sgd_update_(tr, seeds, g, 1e-4, 0.0)
        sync(dev)
        if step:  # the first step warms up allocator and kernels
            times.append(time.time() - t)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    gib = streamer.bytes_per_pass / 2**30
    print("| preset | dtype | streamed GiB | bus floor s | step s | step/floor | peak GPU GiB |")
    print(f"| {a.preset} | {a.dtype} | {gib:.2f} | {floor:.3f} | {step_s:.3f} | {step_s / floor:.2f} | "
          f"{'n/a' if peak is None else f'{peak:.2f}'} |")
    print(json.dumps({"preset": a.preset, "dtype": a.dtype, "device": str(dev), "streamed_gib": round(gib, 3),
                      "bus_floor_s": round(floor, 4), "bus_gib_per_s": round(gib / floor, 2),
                      "step_s": round(step_s, 4), "step_over_floor": round(step_s / floor, 3),
                      "peak_gpu_gib": None if peak is None else round(peak, 3), "build_s": round(build_s, 1)}))


if __name__ == "__main__":
    main()
