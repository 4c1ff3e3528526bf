"""ZO-SGD's update rule: θ ← θ − lr·((1/n) Σ_j g_j z_j + wd·θ), z regenerated from the step's seeds.

LoRA's flat tensor is updated in a fixed number of launches; full mode's tensors chunk by chunk (torch)
or in one launch per dtype (Triton). Half-precision tensors are updated in float32 and stochastically
rounded, the rounding drawn from (step seed, tensor index), so an update far below half an ulp still
moves θ in expectation and a replay repeats it bitwise. The learning-rate schedule lives here too.
"""

from __future__ import annotations

import math

import torch

from zoft.zo.noise import HALF, add_noise_, param_seed, param_seeds, update_half_
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
    n = len(seeds)
    coefs = [-lr * g / n for g in grads]
    if tr.z_backend == "triton":  # decay and every direction in one pass per tensor
        _triton_update_(tr, seeds, coefs, lr, weight_decay)
        return
    for i, t in enumerate(tr.tensors):  # half precision: the sum in float32, one stochastic rounding
        if t.dtype in HALF:
            decay = 1 - lr * weight_decay if weight_decay and tr.decay[i] else 1.0
            update_half_(t.data, [param_seed(s, i) for s in seeds], coefs, decay, rounding_seed(seeds, i))
    wide = [i for i, t in enumerate(tr.tensors) if t.dtype not in HALF]
    decayed = [tr.tensors[i].data for i in wide if tr.decay[i]]
    if weight_decay and decayed:
        torch._foreach_mul_(decayed, 1 - lr * weight_decay)
    for s, c in zip(seeds, coefs):
        for i in wide:
            add_noise_(tr.tensors[i].data, param_seed(s, i), c)


def rounding_seed(seeds: list[int], i: int) -> int:
    """The stochastic rounding's seed for tensor i at a step: a pure function of the step's first
    direction seed and i, apart from every z stream."""
    return param_seed(param_seed(seeds[0], 1 << 40), i)


def _triton_update_(tr: Trainable, seeds: list[int], coefs: list[float], lr: float, weight_decay: float) -> None:
    """The update with the Triton kernels: one launch per dtype for every tensor (a launch per tensor costs
    more host time than the GPU spends on most of them), seeds and coefficients copied to the device once."""
    from zoft.zo.kernels.perturb_triton import UpdatePlan

    n = len(tr.tensors)
    table = param_seeds(seeds, n)  # (n, directions)
    rounding = param_seeds([param_seed(seeds[0], 1 << 40)], n)[:, 0]  # = rounding_seed(seeds, i)
    decay = torch.tensor([1 - lr * weight_decay if weight_decay and d else 1.0 for d in tr.decay], dtype=torch.float32)
    plans = tr.__dict__.setdefault("update_plans", {})
    for dtype in {t.dtype for t in tr.tensors}:
        idx = [i for i, t in enumerate(tr.tensors) if t.dtype == dtype]
        group = [tr.tensors[i].data for i in idx]
        plan = plans.get(dtype)
        if plan is None or not plan.valid(group):
            plan = plans[dtype] = UpdatePlan(group)
        sel = torch.tensor(idx)
        ints = torch.cat([table[sel].reshape(-1), rounding[sel]]).to(group[0].device)
        floats = torch.cat([decay[sel], torch.tensor(coefs, dtype=torch.float32)]).to(group[0].device)
        plan.run(ints, floats, len(seeds))


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
