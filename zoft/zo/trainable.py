"""The zeroth-order estimator and optimizer, as small functions of their inputs.

SPSA (MeZO): for direction j with seed s_j, z_j ~ N(0, I) regenerated from s_j,
    g_j = (L(θ + εz_j) − L(θ − εz_j)) / 2ε,      θ ← θ − lr·( (1/n) Σ_j g_j z_j + wd·θ )
where wd applies only to weights of Linear/Embedding modules and LoRA factors, never to norms or biases.

How L(θ ± εz) is evaluated is the perturber's business (zoft.zo.perturbers); this module holds what the
perturbers and the update share: the trained tensors (``Trainable``), z regenerated from seeds, and
ZO-SGD's update. Half-precision tensors (full mode's bf16/fp16 weights, kept as the only copy) are
updated in float32 and stochastically rounded, the rounding drawn from (step seed, tensor index), so
an update far below half an ulp still moves θ in expectation, and a replay repeats it bitwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zoft.lora import LoRALinear, z_mask
from zoft.zo.noise import param_seed


@dataclass
class Trainable:
    """The tensors ZO perturbs, in a fixed order (their index seeds their z), and which get weight decay."""

    names: list[str]
    tensors: list[torch.Tensor]
    decay: list[bool]
    flat: bool = False  # small (LoRA): one z draw for all tensors per direction, instead of one per tensor
    z_backend: str = "torch"  # per-tensor z (full mode): "torch" (zoft.zo.noise) or "triton" (zoft.zo.kernels)
    store: torch.Tensor | None = None  # LoRA: the flat buffer the tensors were laid out in (zoft.lora.flatten_lora_)
    fixed: list[bool] | None = None  # per tensor: held at its initial value (LoRA-FA's A factors)
    z_mask: torch.Tensor | None = None  # flat sets with fixed tensors: z is multiplied by this (0 on them)
    streamer: object | None = None  # full mode with --offload cpu: the LayerStreamer that holds the trained blocks

    @property
    def z(self):
        """The z backend (zoft.zo.backends) this run draws its full-mode z from."""
        from zoft.zo.backends import BACKENDS

        return BACKENDS[self.z_backend]

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
    return tr.z.tensor_z(tr.tensors[i], param_seed(seed, i))


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


def prefix_trainable(prefix) -> Trainable:
    """Prefix tuning (zoft.prefix.Prefix): one tensor, peft's prompt_embeddings, over one flat store, so
    it takes LoRA's flat path (one z draw, one update, the guard's undo copy, the pipeline)."""
    return Trainable(["prompt_embeddings"], [prefix.theta], [True], flat=True, store=prefix.store)


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
    for i, t in enumerate(tr.tensors):
        tr.z.add_(t.data, param_seed(seed, i), scale)


def _foreach_add(tr: Trainable, zs: list[torch.Tensor], alpha: float) -> None:
    """θ_i += alpha·z_i for every tensor in one fused kernel launch where torch can."""
    torch._foreach_add_([t.data for t in tr.tensors], [z.to(t.dtype) for z, t in zip(zs, tr.tensors)], alpha=alpha)


