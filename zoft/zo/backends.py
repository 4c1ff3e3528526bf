"""Where full mode's z comes from: the torch generator or the Triton kernels, one object each.

The choice is made once per run (zoft.session.resolve_z_backend, recorded in the run's config, since z
differs between the two) and every pass that needs z asks the run's backend:

    z = backend.tensor_z(t, seed)                 all of one tensor's z (float32)
    backend.add_(t, seed, scale)                  t += scale·z, in place
    p, m = backend.pair(t, seed, eps, table_ij)   (t + εz, t − εz) in t's dtype
    p, m = backend.pair_rows(t, idx, seed, eps, table_ij)   the same for rows idx of a 2-D t
    backend.update_(tensors, decay, table, coefs, rounding, cache)    ZO-SGD's update (table: (tensors,
                                                  directions) seeds; rounding: each tensor's rounding seed;
                                                  decay (tensors,) and coefs (directions,): float64 tensors,
                                                  on the host or still on the device)

`seed` is the tensor's own seed (param_seed(direction seed, tensor index)). Triton's z is a function of
(seed, element index), so `pair_rows` generates z at the gathered rows only, and its kernels read their
seeds from a device table (`table_ij`, one element), which a CUDA graph refills every step; the torch
generator's z depends on the tensor's length, so its `pair_rows` draws the whole tensor and gathers.
Half-precision tensors are updated in float32 and stochastically rounded by both. The update never reads
its coefficients on the host: the pipelined loop queues it while g is still being computed, and a replay
from the step log's host floats gives the same bits (each rounds float64 to the arithmetic's dtype alike).
"""

from __future__ import annotations

import torch

from zoft.zo.noise import (
    HALF,
    add_noise_,
    add_scaled_noise_,
    coefficients,
    noise,
    perturbed_pair,
    to_device,
    update_half_,
)


class TorchZ:
    """z from a seeded torch.Generator, chunk by chunk (any device)."""

    name = "torch"
    needs_table = False  # the perturbed forward regenerates z from host seeds (no CUDA graph replay)

    def tensor_z(self, t: torch.Tensor, seed: int) -> torch.Tensor:
        return noise(t, seed)

    def add_(self, t: torch.Tensor, seed: int, scale: float) -> None:
        add_noise_(t, seed, scale)

    def pair(self, t: torch.Tensor, seed: int, eps: float, table_ij=None) -> tuple[torch.Tensor, torch.Tensor]:
        return perturbed_pair(t, noise(t, seed), eps)

    def pair_rows(self, t, idx, seed: int, eps: float, table_ij=None) -> tuple[torch.Tensor, torch.Tensor]:
        return perturbed_pair(t[idx], noise(t, seed)[idx], eps)

    def update_(self, tensors: list[torch.Tensor], decay: torch.Tensor, table: torch.Tensor, coefs: torch.Tensor,
                rounding: torch.Tensor, cache: dict) -> None:
        """Half tensors: the sum in float32, one stochastic rounding. Others: decay, then one rounded add per
        direction (the arithmetic float32 runs have always had, so their replays stay bitwise); float64
        tensors (a float64 master) take the coefficients unrounded."""
        seeds, rounding = table.tolist(), rounding.tolist()  # host tables: only decay and coefs may be on the device
        for i, t in enumerate(tensors):
            wide = torch.float64 if t.dtype == torch.float64 else torch.float32
            d, c = coefficients(decay[i], wide, t.device), coefficients(coefs, wide, t.device)
            if t.dtype in HALF:
                update_half_(t, seeds[i], c, d, rounding[i])
                continue
            t.mul_(d.to(t.dtype))
            for j in range(len(seeds[i])):
                add_scaled_noise_(t, seeds[i][j], c[j].to(t.dtype))


class TritonZ:
    """z from Philox(seed, element index) inside fused kernels (CUDA; zoft.zo.kernels.perturb_triton)."""

    name = "triton"
    needs_table = True

    def tensor_z(self, t: torch.Tensor, seed: int) -> torch.Tensor:
        from zoft.zo.kernels.perturb_triton import randn_triton

        return randn_triton(t.numel(), seed, t.device).view_as(t)

    def add_(self, t: torch.Tensor, seed: int, scale: float) -> None:
        from zoft.zo.kernels.perturb_triton import add_noise_triton_

        add_noise_triton_(t, seed, scale)

    def pair(self, t: torch.Tensor, seed: int, eps: float, table_ij=None) -> tuple[torch.Tensor, torch.Tensor]:
        from zoft.zo.kernels.perturb_triton import perturbed_pair_triton

        return perturbed_pair_triton(t, table_ij if table_ij is not None else _seed_t(seed, t.device), eps)

    def pair_rows(self, t, idx, seed: int, eps: float, table_ij=None) -> tuple[torch.Tensor, torch.Tensor]:
        from zoft.zo.kernels.perturb_triton import perturbed_rows_triton

        return perturbed_rows_triton(t, idx, table_ij if table_ij is not None else _seed_t(seed, t.device), eps)

    def update_(self, tensors: list[torch.Tensor], decay: torch.Tensor, table: torch.Tensor, coefs: torch.Tensor,
                rounding: torch.Tensor, cache: dict) -> None:
        """One launch per dtype for every tensor (a launch per tensor costs more host time than the GPU
        spends on most of them). The host's seeds cross through pinned memory without waiting for the GPU;
        decay and coefs are rounded to float32 where they are. cache: the caller's UpdatePlans (each
        tensor's address and size on the device), per dtype."""
        from zoft.zo.kernels.perturb_triton import UpdatePlan

        dev = tensors[0].device
        decay32, coefs32 = coefficients(decay, torch.float32, dev), coefficients(coefs, torch.float32, dev)
        for dtype in {t.dtype for t in tensors}:
            idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            group = [tensors[i] for i in idx]
            plan = cache.get(dtype)
            if plan is None or not plan.valid(group):
                plan = cache[dtype] = UpdatePlan(group)
            sel = torch.tensor(idx)
            ints = to_device(torch.cat([table[sel].reshape(-1), rounding[sel]]), dev)
            mine = decay32 if len(idx) == len(tensors) else decay32.index_select(0, to_device(sel, dev))
            plan.run(ints, torch.cat([mine, coefs32]), coefs32.numel())


def _seed_t(seed: int, device) -> torch.Tensor:
    return torch.tensor([seed], dtype=torch.int64, device=device)


BACKENDS = {"torch": TorchZ(), "triton": TritonZ()}
