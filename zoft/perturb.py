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
