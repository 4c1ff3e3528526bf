"""Seeded perturbations in one pass over memory: x ← decay·x + Σ_j c_j·z_j, z_j = Philox(seed_j, index).

MeZO touches every trained parameter four times a step (+εz, −2εz, +εz, update). The torch path
(``zoft.perturb``) generates z chunk by chunk with a ``torch.Generator`` and then adds it: per chunk one
write of z and two reads, plus the launch of each. Here one kernel reads x once, computes z in registers
from a counter-based generator (Philox via ``tl.randn(seed, offsets)``, as in Triton's low-memory dropout
tutorial) and writes x once. z is a pure function of (seed, element index): no chunk size, no generator
state, and any pass — perturb, restore, update, replay from a step log — regenerates it exactly.

Arithmetic is float32 whatever x's dtype: x is loaded, upcast, updated, and rounded once on store (so a
bf16 tensor gets one rounding per pass, where ``perturb.add_noise_`` rounds z to bf16 first, then the sum).

Public calls (all in place, on a contiguous CUDA tensor of float32, bfloat16 or float16):

    add_noise_triton_(t, seed, scale)                 t += scale·z(seed)
    update_triton_(t, seed, lr, g, weight_decay)      t ← t·(1 − lr·wd) − lr·g·z(seed)
    add_noise_multi_triton_(t, seeds, coefs, decay)   t ← decay·t + Σ_j coefs[j]·z(seeds[j])   (n directions)
    randn_triton(numel, seed, device)                 z itself (the kernel on a zero buffer, scale 1)

Their PyTorch references (``*_reference_``) do the same math with z supplied: torch cannot produce
Triton's Philox stream, so the tests take z from ``randn_triton`` and compare the kernels against them.
With ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (Triton's interpreter, slow): a way to
check them, or to regenerate a GPU run's z, without a GPU.

How it would plug in (not wired: the choice, and what it does to replay, is the lead's):

* ``zoft.perturb.add_noise_(t, seed, scale)``: ``if t.is_cuda and zoft.kernels.AVAILABLE:
  add_noise_triton_(t, seed, scale)``, else the existing ``noise_chunks`` loop. ``zoft.zo.perturb_`` and
  ``inplace_step`` (full-parameter ±εz and the restore) then use the kernel with no change of their own.
* ``zoft.perturb.noise(t, seed)`` (the LoRA banks built by ``zoft.zo.lora_rows``): on CUDA,
  ``randn_triton(t.numel(), seed, t.device).view(t.shape)``. ``noise_chunks`` itself stays the torch
  generator; callers that want the backend go through ``noise``/``add_noise_``.
* ``zoft.zo.sgd_update_``: per tensor, one ``add_noise_multi_triton_(t, seeds, [-lr·g_j/n …],
  decay=1 − lr·wd if decay else 1)`` replaces the ``mul_`` and the n ``add_noise_`` passes.
* Backend by device, decided once: CUDA tensor and ``AVAILABLE`` → Triton; otherwise torch. z differs
  between the two (as it already differs between CPU and CUDA generators), so a run's step log should
  record the backend, and a replay must use the same one (``TRITON_INTERPRET=1`` reproduces it on CPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path (zoft.perturb) needs none of this
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
BLOCK = 1024  # elements per program; memory-bound, so the exact value matters little
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEED_LIMIT = 1 << 63  # seeds are non-negative int64 (zoft.perturb.param_seed gives 63 bits)


if triton is not None:

    @triton.jit
    def _axpz_kernel(x_ptr, n_elements, seed, scale, decay, BLOCK: tl.constexpr):
        """x ← decay·x + scale·z, z[i] = Philox(seed, i); one read and one write of x."""
        pid = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors past 2³¹ elements, same stream below
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        z = tl.randn(seed, offs)
        y = x * decay + scale * z
        tl.store(x_ptr + offs, y.to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _axpz_multi_kernel(x_ptr, n_elements, seeds_ptr, coefs_ptr, n_dirs, decay, BLOCK: tl.constexpr):
        """x ← decay·x + Σ_j coefs[j]·z_j: the n-direction update in one pass."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        acc = tl.load(x_ptr + offs, mask=mask).to(tl.float32) * decay
        for j in range(n_dirs):
            seed = tl.load(seeds_ptr + j)
            coef = tl.load(coefs_ptr + j)
            acc = acc + coef * tl.randn(seed, offs)
        tl.store(x_ptr + offs, acc.to(x_ptr.dtype.element_ty), mask=mask)


def _check(t: torch.Tensor) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("zoft.kernels.perturb_triton needs triton (pip install triton); use zoft.perturb instead")
    if not (t.is_cuda or INTERPRET):
        raise ValueError(f"Triton kernels need a CUDA tensor, got one on {t.device} (or set TRITON_INTERPRET=1)")
    if t.dtype not in DTYPES:
        raise ValueError(f"Triton perturbation supports {DTYPES}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError("Triton perturbation needs a contiguous tensor (z is indexed by flat position)")
    return t.view(-1)


def _check_seed(seed: int) -> int:
    seed = int(seed)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


@torch.no_grad()
def add_noise_triton_(t: torch.Tensor, seed: int, scale: float) -> None:
    """t += scale·z(seed), in place."""
    flat = _check(t)
    if flat.numel():
        _axpz_kernel[_grid(flat.numel())](flat, flat.numel(), _check_seed(seed), float(scale), 1.0, BLOCK=BLOCK)


@torch.no_grad()
def update_triton_(t: torch.Tensor, seed: int, lr: float, g: float, weight_decay: float = 0.0) -> None:
    """t ← t·(1 − lr·wd) − lr·g·z(seed), in place: MeZO's update (decoupled decay) in one pass."""
    flat = _check(t)
    if flat.numel():
        _axpz_kernel[_grid(flat.numel())](
            flat, flat.numel(), _check_seed(seed), float(-lr * g), float(1.0 - lr * weight_decay), BLOCK=BLOCK
        )


@torch.no_grad()
def add_noise_multi_triton_(t: torch.Tensor, seeds: Sequence[int], coefs: Sequence[float], decay: float = 1.0) -> None:
    """t ← decay·t + Σ_j coefs[j]·z(seeds[j]), in place (n directions, one pass)."""
    flat = _check(t)
    if len(seeds) != len(coefs):
        raise ValueError(f"{len(seeds)} seeds but {len(coefs)} coefficients")
    if not flat.numel():
        return
    s = torch.tensor([_check_seed(x) for x in seeds], dtype=torch.int64, device=t.device)
    c = torch.tensor([float(x) for x in coefs], dtype=torch.float32, device=t.device)
    _axpz_multi_kernel[_grid(flat.numel())](flat, flat.numel(), s, c, len(seeds), float(decay), BLOCK=BLOCK)


def randn_triton(numel: int, seed: int, device: torch.device | str) -> torch.Tensor:
    """The z that the kernels use for `seed`: (numel,) float32 (0 + 1·z is exact)."""
    z = torch.zeros(numel, dtype=torch.float32, device=device)
    add_noise_triton_(z, seed, 1.0)
    return z


# ---- PyTorch references: the same math, z supplied ----------------------------------------------


@torch.no_grad()
def add_noise_reference_(t: torch.Tensor, z: torch.Tensor, scale: float) -> None:
    """t += scale·z, computed in float32 and rounded once to t's dtype."""
    t.copy_((t.float() + scale * z.float().view(t.shape)).to(t.dtype))


@torch.no_grad()
def update_reference_(t: torch.Tensor, z: torch.Tensor, lr: float, g: float, weight_decay: float = 0.0) -> None:
    """t ← t·(1 − lr·wd) − lr·g·z, computed in float32 and rounded once."""
    t.copy_((t.float() * (1.0 - lr * weight_decay) - (lr * g) * z.float().view(t.shape)).to(t.dtype))


@torch.no_grad()
def add_noise_multi_reference_(
    t: torch.Tensor, zs: Sequence[torch.Tensor], coefs: Sequence[float], decay: float = 1.0
) -> None:
    """t ← decay·t + Σ_j coefs[j]·zs[j], computed in float32 and rounded once."""
    acc = t.float() * decay
    for z, c in zip(zs, coefs, strict=True):
        acc = acc + c * z.float().view(t.shape)
    t.copy_(acc.to(t.dtype))
