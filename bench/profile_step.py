"""Where a zoft ZO step spends its time on the GPU: the train loop's step under torch.profiler.

    python bench/profile_step.py --model opt-125m --workload sst2 --dtype bfloat16

Runs the step `zoft train` runs (``step_losses`` with the next batch packed ahead, CUDA graphs, the
update queued with g on the device, the losses read one step later), first timed synchronously and
pipelined, then 10 pipelined steps under the profiler: GPU kernel time per step (the floor a pipelined
step cannot beat), CPU time per step, kernel launches per step, and the top ops by GPU time. Random
weights of the preset's shapes (zoft.bench.harness.load_reference).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from zoft.bench.harness import WORKLOADS, load_reference, make_batch
from zoft.config import ModelConfig, ZOConfig
from zoft.models import common
from zoft.session import attach, load_session, make_engine
from zoft.train.pipeline import HostCopy, snapshot
from zoft.train.step import step_losses
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import sgd_update_


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="opt-125m")
    ap.add_argument("--workload", default="sst2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--mode", default="lora", choices=["lora", "full"],
                    help="full: every parameter in --dtype, rows perturber, synchronous steps (as zoft train runs them)")
    ap.add_argument("--graphs", type=int, default=1)
    ap.add_argument("--varlen", type=int, default=-1, help="1: flash varlen attention, 0: the mask path, -1: auto")
    ap.add_argument("--fuse", type=int, default=1, help="0: q/k/v (gate/up) as separate GEMMs and OPT's ReLU "
                    "as its own pass, to measure what fusing them saves")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    ref, folder = load_reference(a.model, getattr(torch, a.dtype), "cuda", tmp)
    del ref
    s = load_session(ModelConfig(model=folder, device="cuda", dtype=a.dtype))
    zc = ZOConfig(mode=a.mode)
    attach(s, zc)
    lazy = a.mode == "lora"
    common.RELU_EPILOGUE = bool(a.fuse)
    eng = make_engine(s, cuda_graphs=bool(a.graphs), varlen=None if a.varlen < 0 else bool(a.varlen),
                      fuse=bool(a.fuse))
    n = 40
    batches = [make_batch(WORKLOADS[a.workload], 16, 50000, 2, i) for i in range(n + 1)]
    ahead: dict = {}

    def step(i):
        seeds = direction_seeds(0, i, 1)
        lp, lm, g = step_losses(eng, s, batches[i % n], "candidate", seeds, zc.eps_value,
                                packed=ahead.pop("packed", None), next_batch=batches[(i + 1) % n], ahead=ahead,
                                lazy=lazy)
        if lazy:
            snapshot(s)
        sgd_update_(s.trainable, seeds, g, zc.lr_value, 0.0)
        return HostCopy(torch.cat([lp, lm, torch.as_tensor(g, dtype=lp.dtype, device=lp.device)]))

    def run(lo, hi, pipelined):
        pending = None
        for i in range(lo, hi):
            nxt = step(i)
            if not pipelined:
                nxt.read()
                continue
            if pending is not None:
                pending.read()
            pending = nxt
        if pending is not None:
            pending.read()

    run(0, 2 * n, True)  # warm-up: every batch shape met twice, so recorded
    sync_ms = []
    for i in range(2 * n, 3 * n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(i, i + 1, False)
        torch.cuda.synchronize()
        sync_ms.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(3 * n, 4 * n, True)
    torch.cuda.synchronize()
    piped = (time.perf_counter() - t0) * 1e3 / n
    print(f"{a.model} {a.workload} {a.mode} {a.dtype} graphs={bool(a.graphs)} varlen={eng.varlen} fused={eng.fused} relu_epilogue={common.RELU_EPILOGUE} on {torch.cuda.get_device_name()}: "
          f"synchronous step median {statistics.median(sync_ms):.2f} ms, pipelined {piped:.2f} ms/step")
    if s.device.startswith("cuda") and eng.graphs is not None:
        g = eng.graphs
        print(f"graphs: {g.captures} recorded, {g.replays} replays, {g.eager} eager")

    from torch.profiler import ProfilerActivity, profile

    k = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        run(4 * n, 4 * n + k, True)
        torch.cuda.synchronize()
    events = p.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels if "Memcpy" not in e.name and "Memset" not in e.name)
    launches = [e for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch",
                                                 "cudaLaunchKernelExC", "cuLaunchKernelEx")]
    print(f"per step under the profiler: GPU kernel time {gpu_us / k / 1e3:.2f} ms, {len(kernels) / k:.0f} kernels, "
          f"{len(launches) / k:.0f} launch calls from the host")
    ka = p.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
