"""Where full mode's z comes from: the torch generator or the Triton kernels, one object each.

The choice is made once per run (zoft.session.resolve_z_backend, recorded in the run's config, since z
differs between the two) and every pass that needs z asks the run's backend:

    z = backend.tensor_z(t, seed)                 all of one tensor's z (float32)
    backend.add_(t, seed, scale)                  t += scale·z, in place
    p, m = backend.pair(t, seed, eps, table_ij)   (t + εz, t − εz) in t's dtype
    p, m = backend.pair_rows(t, idx, seed, eps, table_ij)   the same for rows idx of a 2-D t
    backend.update_(tensors, decay, table, coefs, rounding, cache)    ZO-SGD's update (table: (tensors,
                                                  directions) seeds; rounding: each tensor's rounding seed)

`seed` is the tensor's own seed (param_seed(direction seed, tensor index)). Triton's z is a function of
(seed, element index), so `pair_rows` generates z at the gathered rows only, and its kernels read their
seeds from a device table (`table_ij`, one element), which a CUDA graph refills every step; the torch
generator's z depends on the tensor's length, so its `pair_rows` draws the whole tensor and gathers.
Half-precision tensors are updated in float32 and stochastically rounded by both.
"""

from __future__ import annotations

import torch

from zoft.zo.noise import HALF, add_noise_, noise, perturbed_pair, update_half_


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

    def update_(self, tensors: list[torch.Tensor], decay: list[float], table: torch.Tensor, coefs: list[float],
                rounding: torch.Tensor, cache: dict) -> None:
        """Half tensors: the sum in float32, one stochastic rounding. Others: decay, then one rounded add per
        direction (the arithmetic float32 runs have always had, so their replays stay bitwise)."""
        seeds, rounding, wide = table.tolist(), rounding.tolist(), []
        for i, t in enumerate(tensors):
            if t.dtype in HALF:
                update_half_(t, seeds[i], coefs, decay[i], rounding[i])
            else:
                wide.append(i)
        for d in sorted({decay[i] for i in wide if decay[i] != 1.0}):
            torch._foreach_mul_([tensors[i] for i in wide if decay[i] == d], d)
        for j, c in enumerate(coefs):
            for i in wide:
                add_noise_(tensors[i], seeds[i][j], c)


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

    def update_(self, tensors: list[torch.Tensor], decay: list[float], table: torch.Tensor, coefs: list[float],
                rounding: torch.Tensor, cache: dict) -> None:
        """One launch per dtype for every tensor (a launch per tensor costs more host time than the GPU
        spends on most of them); seeds and coefficients cross to the device once. cache: the caller's
        UpdatePlans (each tensor's address and size on the device), per dtype."""
        from zoft.zo.kernels.perturb_triton import UpdatePlan

        decay_t = torch.tensor(decay, dtype=torch.float32)
        for dtype in {t.dtype for t in tensors}:
            idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            group = [tensors[i] for i in idx]
            plan = cache.get(dtype)
            if plan is None or not plan.valid(group):
                plan = cache[dtype] = UpdatePlan(group)
            sel = torch.tensor(idx)
            ints = torch.cat([table[sel].reshape(-1), rounding[sel]])
            floats = torch.cat([decay_t[sel], torch.tensor(coefs, dtype=torch.float32)])
            plan.run(ints.to(group[0].device), floats.to(group[0].device), len(coefs))


def _seed_t(seed: int, device) -> torch.Tensor:
    return torch.tensor([seed], dtype=torch.int64, device=device)


BACKENDS = {"torch": TorchZ(), "triton": TritonZ()}
