"""Full-parameter ZO on the top blocks: MeZO's in-place passes vs both signs as rows of one forward.

    python bench/full_rows_bench.py --model opt-125m --workload sst2 --layers top4 --dtype bfloat16

Times the train loop's step (``step_losses`` + ``sgd_update_``, next batch packed ahead) for
``--full-step inplace`` (+εz, forward, −2εz, forward, +εz, update; graphs replay the trained blocks)
and ``--full-step rows`` (one forward of both rows, x·Wᵀ once plus the seeded ±ε·x·Zᵀ per Linear; θ
untouched), on the same random weights of the preset's shapes and the same batches, one after the other
in one process. Median of --steps after --warmup, synchronised around each step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from zoft.bench.harness import WORKLOADS, load_reference, make_batch
from zoft.config import ModelConfig, ZOConfig
from zoft.session import attach, load_session, make_engine, pick_device
from zoft.train.step import step_losses
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import sgd_update_


def time_mode(folder, dtype, device, full_step, layers, batches, warmup, steps) -> dict:
    s = load_session(ModelConfig(model=folder, device=device, dtype=dtype))
    zc = ZOConfig(mode="full", layers=layers, full_step=full_step)
    attach(s, zc)
    eng = make_engine(s)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ahead, times = {}, []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        seeds = direction_seeds(0, i, 1)
        lp, lm, g = step_losses(eng, s, batches[i], "candidate", seeds, zc.eps_value, packed=ahead.pop("packed", None),
                                next_batch=batches[i + 1] if i + 1 < len(batches) else None, ahead=ahead)
        sgd_update_(s.trainable, seeds, g, zc.lr_value, 0.0)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"step_ms": round(statistics.median(times), 3), "peak_mb": peak, "trainable": s.trainable.numel(),
            "z_backend": s.trainable.z_backend}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="opt-125m")
    ap.add_argument("--workload", default="sst2")
    ap.add_argument("--layers", default="top4")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    device = pick_device(a.device)
    with tempfile.TemporaryDirectory() as tmp:
        ref, folder = load_reference(a.model, getattr(torch, a.dtype), device, tmp)
        vocab, bos = ref.config.vocab_size, ref.config.bos_token_id
        del ref
        batches = [make_batch(WORKLOADS[a.workload], 16, vocab, bos, i) for i in range(a.warmup + a.steps)]
        out = {"model": a.model, "workload": a.workload, "layers": a.layers, "dtype": a.dtype,
               "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"}
        for mode in ("inplace", "rows"):
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            out[mode] = time_mode(folder, a.dtype, device, mode, a.layers, batches, a.warmup, a.steps)
            torch.cuda.empty_cache() if device.startswith("cuda") else None
    out["rows_speedup"] = round(out["inplace"]["step_ms"] / out["rows"]["step_ms"], 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
