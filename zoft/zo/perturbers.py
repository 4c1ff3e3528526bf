"""How a ZO step evaluates L(θ ± εz): one perturber per run, chosen once (zoft.session.attach).

    lp, lm, g = estimate(loss_fn, perturber, seeds, eps)      # loss_fn(rows) -> (P,) losses

A perturber turns the step's direction seeds into losses, interleaved [L(θ+εz_1), L(θ−εz_1), …]:

* ``LoRAPerturber``: all 2n perturbed adapters as rows of one forward. Every module's rows are slices
  of one flat (2n, D) bank (``zoft.lora.RowBank``) written from θ and z in a few kernels; the forward
  receives them as a ``LoRARows`` argument. θ is not touched until the update.
* ``PrefixPerturber``: prefix tuning's P_v keys and values per layer (zoft.prefix) as rows of one
  forward, the same way: a (2n, D) bank of θ ± εz_j, row block p's attention reading its prefix from
  row p of the bank (``PrefixRows.prefix_kv``).
* ``FullRowsPerturber``: full parameters as rows of one forward. Each trained Linear computes row block
  2j with W + εZ_j and block 2j+1 with W − εZ_j, the two perturbed weights made for that one layer from
  one read of W (z from (seed, element index); the Triton kernel never stores z) and dropped after its
  two GEMMs. Norms run per row block with perturbed parameters; embeddings gather perturbed rows
  (z generated only at the rows looked up); the LM head is perturbed like a Linear. θ is never
  modified, so the half-precision weights carry no rounding from the perturbation, and the step's
  only write to θ is the update (stochastically rounded, zoft.zo.sgd_update_).
* ``InPlacePerturber``: MeZO's passes: θ += εz, forward, θ −= 2εz, forward, θ += εz. Memory of
  inference with any model (the transformers fallback too); in float32 the restore is exact to
  rounding, in half precision it would not be (zoft.session refuses that combination).

What each may reuse is in DESIGN.md: rows share every frozen weight's read, never a hidden state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from zoft.lora import LoRALinear, RowBank, _half_plan, bank_views
from zoft.models.common import PLAIN, Rows
from zoft.zo.noise import param_seed, param_seeds
from zoft.zo.trainable import Trainable, _flat_z, perturb_

LossFn = Callable[[Rows], torch.Tensor]


def estimate(loss_fn: LossFn, perturber, seeds: list[int], eps: float,
             before_sync: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPSA: L₊, L₋ (n,) and g_j = (L₊ − L₋)/2ε as float64 tensors on the losses' device.
    before_sync runs once the forward is queued and before anything reads it (host work such as packing
    the next batch then overlaps the forward on a GPU)."""
    losses = perturber.losses(loss_fn, seeds, eps).double()
    if before_sync is not None:
        before_sync()
    lp, lm = losses[0::2], losses[1::2]
    return lp, lm, (lp - lm) / (2 * eps)


# ---- LoRA ---------------------------------------------------------------------------------------


def fill_query_rows(theta: torch.Tensor, q, bank: torch.Tensor) -> None:
    """bank[r] = θ + coef[r]·u[dir[r]] (dir −1: θ itself): a method's Query as rows of a (P, D) bank."""
    D = theta.numel()
    u = torch.cat([q.u.new_zeros(1, D), q.u])[torch.tensor(q.dir, device=q.u.device) + 1]  # (P, D)
    coef = torch.tensor(q.coef, dtype=torch.float64).to(theta.device, bank.dtype)[:, None]
    torch.add(theta[None], coef * u, out=bank)


class LoRARows(Rows):
    """Row block 2j uses adapters θ + εz_j, block 2j+1 uses θ − εz_j; frozen weights are shared."""

    def __init__(self, P: int, views: dict, bank: torch.Tensor, modules: list[LoRALinear]):
        super().__init__(P)
        self.views, self.bank, self.modules = views, bank, modules

    def linear(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        v = self.views.get(mod) if isinstance(mod, LoRALinear) else None
        return mod(x) if v is None else mod.add_update(x, mod.base(x), v)

    def update(self, mod: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return mod.add_update(x, y, self.views.get(mod)) if isinstance(mod, LoRALinear) else y

    def graph_tensor(self) -> torch.Tensor:
        return self.bank

    def over(self, t: torch.Tensor) -> LoRARows:
        return LoRARows(self.P, bank_views(self.modules, t), t, self.modules)


class LoRAPerturber:
    """LoRA adapters perturbed as rows of one forward (module docstring)."""

    def __init__(self, loras: dict[str, LoRALinear], tr: Trainable):
        self.modules, self.tr = list(loras.values()), tr
        self.banks: dict[int, RowBank] = {}  # one persistent bank per row count

    def rows(self, seeds: list[int], eps: float) -> LoRARows:
        theta = self.tr.flat_values()
        z = torch.stack([_flat_z(self.tr, s) for s in seeds]).repeat_interleave(2, dim=0)  # (2n, D)
        signs = torch.full((2 * len(seeds), 1), eps, device=theta.device, dtype=z.dtype)  # built there: no host copy
        signs[1::2] = -eps
        # float32 z; float64 θ (the exactness tests) stays float64
        P, D, dtype = 2 * len(seeds), theta.numel(), torch.promote_types(theta.dtype, z.dtype)
        rb = self.bank(P, D, dtype, theta.device)
        torch.add(theta[None], signs * z, out=rb.bank)
        return LoRARows(P, rb.refresh(), rb.bank, self.modules)

    def bank(self, P: int, D: int, dtype: torch.dtype, device: torch.device) -> RowBank:
        rb = self.banks.get(P)
        if rb is None or not rb.matches(self.modules, D, dtype, device):
            rb = self.banks[P] = RowBank(self.modules, P, D, dtype, device, _half_plan(self.modules, device, dtype))
        return rb

    def query_rows(self, q) -> LoRARows:
        """The rows of a zoft.zo.methods Query: row r holds θ + coef[r]·u[dir[r]] (dir −1: θ itself)."""
        theta = self.tr.flat_values()
        P, dtype = len(q.dir), torch.promote_types(theta.dtype, q.u.dtype)
        rb = self.bank(P, theta.numel(), dtype, theta.device)
        fill_query_rows(theta, q, rb.bank)
        return LoRARows(P, rb.refresh(), rb.bank, self.modules)

    def losses(self, loss_fn: LossFn, seeds: list[int], eps: float) -> torch.Tensor:
        return loss_fn(self.rows(seeds, eps))


# ---- prefix tuning -------------------------------------------------------------------------------


class PrefixRows(Rows):
    """Row block 2j attends to the prefix θ + εz_j, block 2j+1 to θ − εz_j: rows of one (P, D) bank."""

    def __init__(self, P: int, bank: torch.Tensor):
        super().__init__(P)
        self.bank = bank

    def prefix_kv(self, slot) -> tuple[torch.Tensor, torch.Tensor]:
        return slot.kv(self.bank)  # (P, kv_heads, P_v, head_dim) each: views of the bank

    def graph_tensor(self) -> torch.Tensor:
        return self.bank

    def over(self, t: torch.Tensor) -> PrefixRows:
        return PrefixRows(self.P, t)


class PrefixPerturber:
    """The prefix perturbed as rows of one forward (module docstring); θ is not touched until the update."""

    def __init__(self, tr: Trainable):
        self.tr = tr
        self.banks: dict[int, torch.Tensor] = {}  # one persistent bank per row count (a CUDA graph's input)

    def rows(self, seeds: list[int], eps: float) -> PrefixRows:
        theta = self.tr.flat_values()
        z = torch.stack([_flat_z(self.tr, s) for s in seeds]).repeat_interleave(2, dim=0)  # (2n, D)
        signs = torch.full((2 * len(seeds), 1), eps, device=theta.device, dtype=z.dtype)
        signs[1::2] = -eps
        P, dtype = 2 * len(seeds), torch.promote_types(theta.dtype, z.dtype)  # float64 θ (tests) stays float64
        bank = self.bank(P, theta, dtype)
        torch.add(theta[None], signs * z, out=bank)
        return PrefixRows(P, bank)

    def bank(self, P: int, theta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        bank = self.banks.get(P)
        if bank is None or bank.shape[1] != theta.numel() or bank.dtype != dtype or bank.device != theta.device:
            bank = self.banks[P] = torch.empty(P, theta.numel(), dtype=dtype, device=theta.device)
        return bank

    def query_rows(self, q) -> PrefixRows:
        """The rows of a zoft.zo.methods Query (LoRAPerturber.query_rows' rows, over the prefix)."""
        theta = self.tr.flat_values()
        P = len(q.dir)
        bank = self.bank(P, theta, torch.promote_types(theta.dtype, q.u.dtype))
        fill_query_rows(theta, q, bank)
        return PrefixRows(P, bank)

    def losses(self, loss_fn: LossFn, seeds: list[int], eps: float) -> torch.Tensor:
        return loss_fn(self.rows(seeds, eps))


# ---- full parameters as rows ----------------------------------------------------------------------


class FullRows(Rows):
    """Row block 2j sees θ + εz_j and block 2j+1 sees θ − εz_j, for every trained tensor (module docstring).
    `table`: (tensors, directions) int64 seeds on the device for the Triton kernels (a CUDA graph's input),
    or None for the torch generator, which regenerates z from the host seeds."""

    def __init__(self, owner: FullRowsPerturber, seeds: list[int], eps: float, table: torch.Tensor | None):
        super().__init__(2 * len(seeds))
        self.owner, self.seeds, self.eps, self.table = owner, seeds, eps, table
        self.perturbs_embeddings = owner.perturbs_embeddings

    def _i(self, t: torch.Tensor | None) -> int | None:
        return None if t is None else self.owner.index.get(id(t))

    def _seed(self, i: int, j: int) -> tuple[int, torch.Tensor | None]:
        """Tensor i's seed at direction j: on the host, and (Triton) its cell of the device table."""
        return param_seed(self.seeds[j], i), None if self.table is None else self.table[i, j : j + 1]

    def pair(self, i: int, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ_i + εz_j, θ_i − εz_j) in θ_i's dtype."""
        seed, cell = self._seed(i, j)
        return self.owner.tr.z.pair(self.owner.tr.tensors[i].data, seed, self.eps, cell)

    def pair_rows(self, i: int, j: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows idx of a 2-D θ_i, perturbed both ways (z generated only there with Triton)."""
        seed, cell = self._seed(i, j)
        return self.owner.tr.z.pair_rows(self.owner.tr.tensors[i].data, idx, seed, self.eps, cell)

    def fusable(self, mods: list[nn.Module]) -> bool:
        return not any(self._i(p) is not None for m in mods for p in (m.weight, getattr(m, "bias", None)))

    def linear(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        wi, bi = self._i(mod.weight), self._i(mod.bias)
        if wi is None and bi is None:
            return mod(x)
        xr = x.reshape(self.P, -1, x.shape[-1])  # (P, tokens per row block, in)
        y = x.new_empty(self.P, xr.shape[1], mod.out_features)
        for j in range(self.P // 2):
            ws = self.pair(wi, j) if wi is not None else (mod.weight, mod.weight)
            bs = self.pair(bi, j) if bi is not None else (mod.bias, mod.bias)
            for k, w, b in ((2 * j, ws[0], bs[0]), (2 * j + 1, ws[1], bs[1])):
                if b is None:
                    torch.matmul(xr[k], w.t(), out=y[k])
                else:
                    torch.addmm(b, xr[k], w.t(), out=y[k])
        return y.view(*x.shape[:-1], -1)

    def norm(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        own = {n: self._i(p) for n, p in mod.named_parameters(recurse=False)}
        own = {n: i for n, i in own.items() if i is not None}
        if not own:
            return mod(x)
        xs, outs = x.chunk(self.P, 0), []
        for j in range(self.P // 2):
            pairs = {n: self.pair(i, j) for n, i in own.items()}
            for k in (0, 1):
                params = {n: p[k] for n, p in pairs.items()}
                outs.append(torch.func.functional_call(mod, params, (xs[2 * j + k],)))
        return torch.cat(outs)

    def embedding(self, emb: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        """ids: the P row blocks' ids stacked along dim 0 (the engine repeats them when they are equal)."""
        wi = self._i(emb.weight)
        if wi is None:
            return emb(ids)
        blocks, outs = ids.chunk(self.P, 0), []
        for j in range(self.P // 2):
            for k in (0, 1):
                idx = blocks[2 * j + k]
                outs.append(self.pair_rows(wi, j, idx.reshape(-1))[k].view(*idx.shape, -1))
        return torch.cat(outs)

    def head_rows(self, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        wi = self._i(w)
        if wi is None:
            return w[idx]
        return torch.stack([r for j in range(self.P // 2) for r in self.pair_rows(wi, j, idx)])  # (P, M, D)

    def logits(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        wi = self._i(w)
        if wi is None:
            return F.linear(h.to(w.dtype), w)
        hs, outs = h.chunk(self.P, 0), []
        for j in range(self.P // 2):
            ws = self.pair(wi, j)
            outs += [F.linear(hs[2 * j + k].to(w.dtype), ws[k]) for k in (0, 1)]
        return torch.cat(outs)

    @property
    def graphable(self) -> bool:
        return self.table is not None  # the torch generator's z is fixed at recording: never replay it

    def graph_tensor(self) -> torch.Tensor | None:
        return self.table

    def over(self, t: torch.Tensor) -> FullRows:
        return FullRows(self.owner, self.seeds, self.eps, t)


class FullRowsPerturber:
    """Full parameters perturbed as rows of one forward, θ never modified (module docstring)."""

    def __init__(self, model: nn.Module, tr: Trainable, device: torch.device | str | None = None):
        self.tr = tr
        self.device = torch.device(device) if device is not None else tr.tensors[0].device  # streamed θ is on the host
        self.index = {id(t): i for i, t in enumerate(tr.tensors)}
        self.perturbs_embeddings = any(isinstance(m, nn.Embedding) and id(m.weight) in self.index
                                       for m in model.modules())
        self.staging: torch.Tensor | None = None  # pinned host buffer for the seed table (reused every step)

    def rows(self, seeds: list[int], eps: float) -> FullRows:
        table = None
        if self.tr.z.needs_table:
            table = seed_table(self, seeds, len(self.tr.tensors), self.device)
        return FullRows(self, seeds, eps, table)

    def losses(self, loss_fn: LossFn, seeds: list[int], eps: float) -> torch.Tensor:
        return loss_fn(self.rows(seeds, eps))


def seed_table(holder, seeds: list[int], n: int, device: torch.device) -> torch.Tensor:
    """param_seed(seeds[j], i) for every tensor i as an (n, len(seeds)) int64 tensor on `device`, through a
    pinned buffer kept on `holder` (asynchronous on CUDA: the host does not wait for the GPU)."""
    host = param_seeds(seeds, n)
    if torch.device(device).type != "cuda":
        return host.to(device)
    if holder.staging is None or holder.staging.shape != host.shape:
        holder.staging = torch.empty(host.shape, dtype=torch.int64, pin_memory=True)
    else:  # the last step's copy out of the buffer must be done before it is overwritten
        holder.staging_done.synchronize()
    holder.staging.copy_(host)
    out = holder.staging.to(device, non_blocking=True)
    holder.staging_done = torch.cuda.Event()
    holder.staging_done.record()
    return out


# ---- in place -----------------------------------------------------------------------------------


class InPlacePerturber:
    """MeZO's in-place passes over θ, one forward per sign and direction (module docstring)."""

    def __init__(self, tr: Trainable):
        self.tr = tr

    def losses(self, loss_fn: LossFn, seeds: list[int], eps: float) -> torch.Tensor:
        out = []
        for s in seeds:
            perturb_(self.tr, s, eps)
            out.append(loss_fn(PLAIN)[0])
            perturb_(self.tr, s, -2 * eps)
            out.append(loss_fn(PLAIN)[0])
            perturb_(self.tr, s, eps)
        return torch.stack(out)
