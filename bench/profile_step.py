"""Where a zoft ZO step spends its time on the GPU: phase timings and the profiler's top ops.

    python bench/profile_step.py --model opt-125m --workload sst2 --mode lora --dtype bfloat16
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from zoft.bench import WORKLOADS, load_reference, make_batch
from zoft.config import ModelConfig, ZOConfig
from zoft.engine import row_losses
from zoft.session import attach, load_session, make_engine
from zoft.zo import direction_seeds, lora_rows, sgd_update_


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="opt-125m")
    ap.add_argument("--workload", default="sst2")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    ref, folder = load_reference(a.model, getattr(torch, a.dtype), "cuda", tmp)
    del ref
    s = load_session(ModelConfig(model=folder, device="cuda", dtype=a.dtype))
    attach(s, ZOConfig(mode="lora"))
    eng = make_engine(s)
    enc = make_batch(WORKLOADS[a.workload], 16, 50000, 2, 0)
    sync = torch.cuda.synchronize
    phases = {"batch": [], "rows_setup": [], "forward": [], "update": []}

    def step(i, record=True):
        t = [time.perf_counter()]
        b = eng.batch(enc)
        sync()
        t.append(time.perf_counter())
        seeds = direction_seeds(0, i, 1)
        cm = lora_rows(s.loras, seeds, 1e-2)
        cm.__enter__()
        sync()
        t.append(time.perf_counter())
        losses = row_losses(eng.scores(b, 2, b.single_token), b, "candidate").double()
        g = ((losses[0] - losses[1]) / 2e-2).item()
        cm.__exit__(None, None, None)
        t.append(time.perf_counter())
        sgd_update_(s.trainable, seeds, [g], 1e-4, 0.0)
        sync()
        t.append(time.perf_counter())
        if record:
            for k, (x, y) in zip(phases, zip(t, t[1:])):
                phases[k].append((y - x) * 1e3)

    for i in range(5):
        step(i, False)
    for i in range(10):
        step(i)
    for k, v in phases.items():
        v.sort()
        print(f"{k:12s} median {v[len(v) // 2]:8.2f} ms")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for i in range(3):
            step(100 + i, False)
    ka = p.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=50))
    print(ka.table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=50))


if __name__ == "__main__":
    main()
