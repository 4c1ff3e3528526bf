"""The zeroth-order estimator and optimizer, as small functions of their inputs.

SPSA (MeZO): for direction j with seed s_j, z_j ~ N(0, I) regenerated from s_j,
    g_j = (L(θ + εz_j) − L(θ − εz_j)) / 2ε,      θ ← θ − lr·( (1/n) Σ_j g_j z_j + wd·θ )
where wd applies only to weights of Linear/Embedding modules and LoRA factors, never to norms or biases.

How L(θ ± εz) is evaluated is the perturber's business (zoft.perturbers); this module holds what the
perturbers and the update share: the trained tensors (``Trainable``), z regenerated from seeds, and
ZO-SGD's update. Half-precision tensors (full mode's bf16/fp16 weights, kept as the only copy) are
updated in float32 and stochastically rounded, the rounding drawn from (step seed, tensor index), so
an update far below half an ulp still moves θ in expectation, and a replay repeats it bitwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from zoft.lora import LoRALinear, z_mask
from zoft.perturb import HALF, add_noise_, noise, param_seed, param_seeds, update_half_


@dataclass
class Trainable:
    """The tensors ZO perturbs, in a fixed order (their index seeds their z), and which get weight decay."""

    names: list[str]
    tensors: list[torch.Tensor]
    decay: list[bool]
    flat: bool = False  # small (LoRA): one z draw for all tensors per direction, instead of one per tensor
    z_backend: str = "torch"  # per-tensor z (full mode): "torch" (zoft.perturb) or "triton" (zoft.kernels)
    store: torch.Tensor | None = None  # LoRA: the flat buffer the tensors were laid out in (zoft.lora.flatten_lora_)
    fixed: list[bool] | None = None  # per tensor: held at its initial value (LoRA-FA's A factors)
    z_mask: torch.Tensor | None = None  # flat sets with fixed tensors: z is multiplied by this (0 on them)

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def trained(self) -> list[torch.Tensor]:
        """The tensors that change (all but the fixed ones)."""
        return [t for i, t in enumerate(self.tensors) if not (self.fixed and self.fixed[i])]

    def n_trained(self) -> int:
        return sum(t.numel() for t in self.trained())

    def flat_buffer(self) -> torch.Tensor | None:
        """`store` while every tensor still is its consecutive slice (nothing re-pointed one), else None:
        then θ, its snapshot and its update are one tensor each, not one op per LoRA factor (a step's host
        time on a fast GPU)."""
        st = self.store
        if st is None:
            return None
        ptr, size, off = st.data_ptr(), st.element_size(), 0
        for t in self.tensors:
            if t.data_ptr() != ptr + off * size or t.dtype != st.dtype or not t.is_contiguous():
                return None
            off += t.numel()
        return st if off == st.numel() else None

    def flat_values(self, copy: bool = False) -> torch.Tensor:
        """Every tensor's values as one flat tensor: the intact store itself (cloned if `copy`), else a
        concatenation (always a copy)."""
        st = self.flat_buffer()
        if st is not None:
            return st.clone() if copy else st
        return torch.cat([t.detach().reshape(-1) for t in self.tensors])

    def norms(self) -> dict[str, float]:
        """‖θ‖ by kind: LoRA's A and B factors apart, else all together. Logged with each dev evaluation,
        where ZO's random walk shows first: z's component in directions the loss ignores is never pulled
        back, so without weight decay the factors grow like √steps (docs/results.md, sixth session)."""
        kinds = [n.rsplit(".", 1)[-1] if n.endswith(("lora_A", "lora_B")) else "theta" for n in self.names]
        keys = sorted(set(kinds))
        # vector_norm reduces in place (no squared copy of a large full-mode tensor at evaluation time)
        sq = [sum(torch.linalg.vector_norm(t.detach()).double() ** 2 for k2, t in zip(kinds, self.tensors) if k2 == k)
              for k in keys]
        return {f"norm_{k}": v ** 0.5 for k, v in zip(keys, torch.stack(sq).tolist())}


def directions(tr: Trainable, seed: int) -> list[torch.Tensor]:
    """z for each tensor of `tr` at direction seed `seed`. For flat (LoRA) sets, one generator call covers
    every tensor (the GPU step is launch-bound; one randn instead of one per factor); otherwise each
    tensor has its own seeded stream (what the chunked in-place passes regenerate)."""
    if tr.flat:
        z = _flat_z(tr, seed)
        return [v.view_as(t) for v, t in zip(z.split([t.numel() for t in tr.tensors]), tr.tensors, strict=True)]
    return [tensor_z(tr, i, seed) for i in range(len(tr.tensors))]


def tensor_z(tr: Trainable, i: int, seed: int) -> torch.Tensor:
    """All of tensor i's z at direction seed `seed` (float32): the values the in-place passes add."""
    t = tr.tensors[i]
    if tr.z_backend == "triton":
        from zoft.kernels.perturb_triton import randn_triton

        return randn_triton(t.numel(), param_seed(seed, i), t.device).view_as(t)
    return noise(t, param_seed(seed, i))


def _flat_z(tr: Trainable, seed: int) -> torch.Tensor:
    dev = tr.tensors[0].device
    gen = torch.Generator(device=dev)
    gen.manual_seed(param_seed(seed, 0))
    z = torch.randn(tr.numel(), generator=gen, device=dev, dtype=torch.float32)
    return z if tr.z_mask is None else z.mul_(tr.z_mask)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm | nn.GroupNorm) or type(module).__name__.endswith("Norm")


def lora_trainable(loras: dict[str, LoRALinear]) -> Trainable:
    names, tensors, fixed = [], [], []
    for path, m in loras.items():
        names += [f"{path}.lora_A", f"{path}.lora_B"]
        tensors += [m.lora_A, m.lora_B]
        fixed += [not m.train_a, False]
    first = next(iter(loras.values()), None)
    store = getattr(first, "store", None)
    # the mask is made once with the flat store; unflattened modules (tests) get a fresh one
    mask = first.z_mask if store is not None else (z_mask(loras, tensors[0].device) if loras else None)
    return Trainable(names, tensors, [not f for f in fixed], flat=True, store=store,
                     fixed=fixed if any(fixed) else None, z_mask=mask)


def full_trainable(model: nn.Module, prefixes: list[str] | None) -> Trainable:
    """Every parameter (or those under the given module prefixes); decay decided by the owning module's type."""
    names, tensors, decay = [], [], []
    seen = set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if id(p) in seen or (prefixes is not None and not any(full.startswith(x + ".") for x in prefixes)):
                continue
            seen.add(id(p))
            names.append(full)
            tensors.append(p)
            decay.append(pname == "weight" and not _is_norm(module))
    return Trainable(names, tensors, decay)


def direction_seeds(run_seed: int, step: int, n: int) -> list[int]:
    return [param_seed(run_seed, step * 1024 + j) for j in range(n)]


def perturb_(tr: Trainable, seed: int, scale: float) -> None:
    """θ += scale·z in place (chunk by chunk for full parameters)."""
    if tr.flat:
        _foreach_add(tr, directions(tr, seed), scale)
        return
    if tr.z_backend == "triton":
        from zoft.kernels.perturb_triton import add_noise_triton_

        for i, t in enumerate(tr.tensors):
            add_noise_triton_(t.data, param_seed(seed, i), scale)
        return
    for i, t in enumerate(tr.tensors):
        add_noise_(t.data, param_seed(seed, i), scale)


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
    from zoft.kernels.perturb_triton import UpdatePlan

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


def _foreach_add(tr: Trainable, zs: list[torch.Tensor], alpha: float) -> None:
    """θ_i += alpha·z_i for every tensor in one fused kernel launch where torch can."""
    torch._foreach_add_([t.data for t in tr.tensors], [z.to(t.dtype) for z, t in zip(zs, tr.tensors)], alpha=alpha)


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
