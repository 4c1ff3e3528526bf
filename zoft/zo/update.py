"""ZO-SGD's update rule: θ ← θ − lr·((1/n) Σ_j g_j z_j + wd·θ), z regenerated from the step's seeds.

LoRA's flat tensor is updated in a fixed number of launches; full mode's tensors chunk by chunk (torch)
or in one launch per dtype (Triton). Half-precision tensors are updated in float32 and stochastically
rounded, the rounding drawn from (step seed, tensor index), so an update far below half an ulp still
moves θ in expectation and a replay repeats it bitwise. The learning-rate schedule lives here too.
"""

from __future__ import annotations

import math

import torch

from zoft.zo.noise import param_seed, param_seeds
from zoft.zo.trainable import Trainable, _flat_z


@torch.no_grad()
def sgd_update_(tr: Trainable, seeds: list[int], grads: list[float] | torch.Tensor, lr: float,
                weight_decay: float) -> None:
    """θ ← θ − lr·((1/n) Σ_j g_j z_j + wd·θ), z regenerated from the seeds (chunk by chunk in full mode).

    LoRA (flat) sets take g as a list or as a float64 tensor on the parameters' device, and do the same
    arithmetic either way (a replay from the step log repeats a pipelined run's update bitwise). A
    tensor g is never read on the host: a non-finite g makes the whole update, decay included, a no-op
    on the device, and the caller, who reads g later, treats the step as rejected."""
    if tr.flat:
        _flat_update_(tr, seeds, grads, lr, weight_decay)
        return
    grads = grads.tolist() if isinstance(grads, torch.Tensor) else grads
    n, k = len(seeds), len(tr.tensors)
    decay = [1 - lr * weight_decay if weight_decay and d else 1.0 for d in tr.decay]
    rounding = param_seeds([param_seed(seeds[0], 1 << 40)], k)[:, 0]  # rounding_seed(seeds, i) for every i
    table, coefs = param_seeds(seeds, k), [-lr * g / n for g in grads]
    if tr.streamer is None:
        tr.z.update_([t.data for t in tr.tensors], decay, table, coefs, rounding, tr.__dict__.setdefault("update_plans", {}))
        return
    # --offload cpu: each streamed block's tensors go to the device, are updated there, and are written back
    tr.streamer.write_through(tr.tensors, lambda idx, ts: tr.z.update_(ts, [decay[i] for i in idx], table[idx], coefs,
                                                                       rounding[idx], {}))


def rounding_seed(seeds: list[int], i: int) -> int:
    """The stochastic rounding's seed for tensor i at a step: a pure function of the step's first
    direction seed and i, apart from every z stream."""
    return param_seed(param_seed(seeds[0], 1 << 40), i)


def _flat_update_(tr: Trainable, seeds: list[int], grads: list[float] | torch.Tensor, lr: float,
                  weight_decay: float) -> None:
    """The LoRA update in a fixed number of launches: Δ = Σ_j (−lr·g_j/n)·z_j over the flat parameter
    vector, then θ_i += Δ_i for every tensor in one foreach kernel."""
    t0 = tr.tensors[0]
    dt = torch.promote_types(t0.dtype, torch.float32)  # float32, or float64 for float64 parameters
    g = grads if isinstance(grads, torch.Tensor) else torch.tensor(grads, dtype=torch.float64)
    g = g.to(t0.device, torch.float64)
    ok = torch.isfinite(g).all()
    alpha = torch.where(ok, g * -lr / len(seeds), 0.0).to(dt)  # the same double arithmetic as -lr * g / n
    z = torch.stack([_flat_z(tr, s) for s in seeds]).to(dt)  # (n, D)
    delta = (alpha[:, None] * z).sum(0) if len(seeds) > 1 else alpha * z[0]
    decayed = [t.data for t, d in zip(tr.tensors, tr.decay) if d]
    if weight_decay and decayed:
        factor = torch.full((), 1 - lr * weight_decay, dtype=torch.float64, device=t0.device)
        torch._foreach_mul_(decayed, torch.where(ok, factor, 1.0).to(t0.dtype))
    flat = tr.flat_buffer()
    if flat is not None:  # one add, the same arithmetic as the per-tensor one below
        flat.add_(delta.to(flat.dtype))
        return
    parts = delta.split([t.numel() for t in tr.tensors])
    torch._foreach_add_([t.data for t in tr.tensors], [d.view_as(t).to(t.dtype) for d, t in zip(parts, tr.tensors)])


def lr_at(step: int, total: int, base: float, schedule: str, warmup: int) -> float:
    """Learning rate for 0-based `step`: linear warm-up, then constant | linear | cosine decay to 0."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    frac = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * max(0.0, 1 - frac)
    if schedule == "cosine":
        return base * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    raise ValueError(f"unknown schedule {schedule!r}")
