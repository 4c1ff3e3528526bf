"""Seeded perturbations that are never stored: z is regenerated from (step seed, parameter index).

Every pass that needs z (the +ε and −ε perturbations, the restore, the update, a replay from the step
log) calls ``noise_chunks`` with the same seed and gets the same values, chunk by chunk, so no
parameter-sized temporary exists. Each parameter has its own ``torch.Generator`` seeded from
(step seed, index); the global generator is never touched.

z differs between CPU and CUDA generators: a run replays bitwise only on the device type it ran on.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

CHUNK = 1 << 20  # elements per generated chunk; fixed, since it decides the values z takes


def param_seed(seed: int, index: int) -> int:
    """A 63-bit seed for parameter `index` at step seed `seed` (splitmix64-style mixing)."""
    x = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


def param_seeds(seeds: list[int], n: int) -> torch.Tensor:
    """(n, len(seeds)) int64: param_seed(seeds[j], i) for every tensor i < n, vectorised (uint64 arithmetic
    wraps like the masks above); a step's seed table for the Triton kernels, without n·len(seeds) Python calls."""
    import numpy as np

    with np.errstate(over="ignore"):
        s = np.array(seeds, dtype=np.uint64)[None, :]
        i = np.arange(n, dtype=np.uint64)[:, None]
        x = s * np.uint64(0x9E3779B97F4A7C15) + i * np.uint64(0xBF58476D1CE4E5B9) + np.uint64(1)
        x ^= x >> np.uint64(31)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(29)
        x &= np.uint64(0x7FFFFFFFFFFFFFFF)
    return torch.from_numpy(x.astype(np.int64))


def noise_chunks(numel: int, seed: int, device: torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (offset, z chunk) covering `numel` standard normals, float32, on `device`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for start in range(0, numel, CHUNK):
        n = min(CHUNK, numel - start)
        yield start, torch.randn(n, generator=gen, device=device, dtype=torch.float32)


def noise(t: torch.Tensor, seed: int) -> torch.Tensor:
    """All of z for a small tensor (a LoRA factor), shaped like t."""
    out = torch.empty(t.numel(), dtype=torch.float32, device=t.device)
    for start, z in noise_chunks(t.numel(), seed, t.device):
        out[start : start + z.numel()] = z
    return out.view(t.shape)


@torch.no_grad()
def add_noise_(t: torch.Tensor, seed: int, scale: float) -> None:
    """t += scale·z in place, chunk by chunk."""
    flat = t.view(-1)
    for start, z in noise_chunks(flat.numel(), seed, t.device):
        flat[start : start + z.numel()].add_(z.to(t.dtype), alpha=scale)


HALF = (torch.bfloat16, torch.float16)


def round_stochastic(acc: torch.Tensor, dtype: torch.dtype, draw: torch.Tensor) -> torch.Tensor:
    """float32 `acc` rounded to `dtype` (bfloat16 or float16), up or down to a neighbour with the
    probabilities that make the result exact in expectation. `draw` holds the randomness, one value per
    element: for bfloat16 integers in [0, 2¹⁶) added below the 16 kept bits before truncating (so a
    value a fraction f of an ulp above the lower neighbour rounds up with probability f); for float16
    uniforms in [0, 1) compared with the residual after rounding toward zero, in ulps. The same
    arithmetic as the Triton kernels (zoft.zo.kernels.perturb_triton._store_rounded)."""
    if dtype == torch.bfloat16:
        bits = acc.float().contiguous().view(torch.int32)
        return ((bits + draw.to(torch.int32)) & -65536).view(torch.float32).to(torch.bfloat16)
    if dtype != torch.float16:
        raise ValueError(f"stochastic rounding is for bfloat16 and float16, got {dtype}")
    acc = acc.float()
    t = acc.to(torch.float16)  # round to nearest; step back toward zero where that rounded away
    tb = t.view(torch.int16)
    tb = torch.where(t.float().abs() > acc.abs(), tb - 1, tb)
    t = tb.view(torch.float16)
    up = (tb + 1).view(torch.float16)
    tf = t.float()
    p = (acc - tf) / (up.float() - tf)
    return torch.where(draw < p, up, t)


def rounding_draw(n: int, dtype: torch.dtype, gen: torch.Generator, device) -> torch.Tensor:
    """The randomness round_stochastic needs for n elements of `dtype`, from `gen`."""
    if dtype == torch.bfloat16:
        return torch.randint(0, 1 << 16, (n,), generator=gen, device=device, dtype=torch.int32)
    return torch.rand(n, generator=gen, device=device, dtype=torch.float32)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without waiting for the work queued there: on CUDA through pinned
    memory (the caching host allocator keeps the buffer until the copy is done), where a pageable copy
    would synchronize the stream."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def coefficients(c, dtype: torch.dtype, device) -> torch.Tensor:
    """The update's coefficients (or decays) as a tensor of the arithmetic's `dtype` on `device`: host floats
    or a float64 tensor (the pipelined loop's, still on the device) are rounded alike, to nearest, as
    torch rounds a Python float that scales a `dtype` tensor."""
    if not isinstance(c, torch.Tensor):
        c = torch.tensor(c, dtype=torch.float64)
    return to_device(c, device).to(dtype)


@torch.no_grad()
def add_scaled_noise_(t: torch.Tensor, seed: int, c: torch.Tensor) -> None:
    """t += c·z in place, chunk by chunk; c a 0-dim tensor of t's dtype. addcmul_ gives add_(z, alpha=c)'s
    bits (one fused multiply-add; measured on the CPU) without reading c on the host."""
    flat = t.view(-1)
    for start, z in noise_chunks(flat.numel(), seed, t.device):
        flat[start : start + z.numel()].addcmul_(z.to(t.dtype), c)


@torch.no_grad()
def update_half_(t: torch.Tensor, seeds: list[int], coefs: list[float] | torch.Tensor, decay: float | torch.Tensor,
                 sr_seed: int) -> None:
    """t ← SR(decay·t + Σ_j coefs[j]·z(seeds[j])) for a bfloat16/float16 t, chunk by chunk: the sum in
    float32 (one rounding, stochastic, instead of one round-to-nearest per term: an update far below
    half an ulp would otherwise vanish). z and the rounding are regenerated from their seeds. coefs and
    decay may be device tensors (nothing here reads them on the host), with the bits host floats give."""
    flat = t.view(-1)
    coefs = coefficients(coefs, torch.float32, t.device)
    if coefs.numel() != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {coefs.numel()} coefficients")
    decay = coefficients(decay, torch.float32, t.device) if isinstance(decay, torch.Tensor) else decay
    streams = [noise_chunks(flat.numel(), s, t.device) for s in seeds]
    gen = torch.Generator(device=t.device)
    gen.manual_seed(sr_seed)
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start : start + CHUNK]
        acc = part.float() * decay
        for j, stream in enumerate(streams):
            acc.addcmul_(next(stream)[1], coefs[j])
        part.copy_(round_stochastic(acc, t.dtype, rounding_draw(part.numel(), t.dtype, gen, t.device)))


def perturbed_pair(w: torch.Tensor, z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w + ε·z, w − ε·z), computed in float32 (or w's wider dtype) and rounded once to w's dtype: the
    arithmetic of perturbed_pair_triton."""
    wide = w.to(torch.promote_types(w.dtype, torch.float32))
    d = eps * z.to(wide.dtype)
    return (wide + d).to(w.dtype), (wide - d).to(w.dtype)
