"""ZO estimators and update rules beside ZO-SGD, chosen with --optimizer (``METHODS``: name → class).

A method owns the rows of a step's one forward and the update that follows it:

    q = method.query(tr, seeds, step, eps)      # row r evaluates θ + q.coef[r]·q.u[q.dir[r]] (dir −1: θ)
    losses = the forward's (P,) row losses      # zoft.zo.perturbers.LoRAPerturber.query_rows, one batched forward
    method.update_(tr, q, losses, lr, wd)       # θ and the method's state, on the device
    g = method.grads(q, losses)                 # g per direction, for the step log (host floats)

Every draw comes from a dedicated generator seeded by the step's direction seeds (LOZO's V: by the run seed
and step // ν), never the global one. `query` is a pure function of (θ, state, seeds, step) and `update_`
of (θ, state, q, losses, lr): the step log records the row losses, so `replay_` (``zoft replay``, --resume's
catch-up) calls both with the same inputs and repeats each update bitwise. No method here needs anything
the log lacks, so every one is rebuilt from the base weights and the log alone.

`update_` takes the losses as the forward's float64 device tensor (the pipelined loop queues the update
before the host reads them) or as the logged floats (replay, resume, the synchronous loop). Both become
the same float64 tensor on θ's device (a float64 value survives the host round trip exactly), and every
coefficient is computed from it with device arithmetic: neither `query` nor `update_` waits for the GPU.

The methods train flat trainables (LoRA; prefix tuning): directions are materialised as an (m, D) tensor,
cheap at D ~ 1e5–1e6. Full mode keeps ZO-SGD (zoft.zo.update): a state vector per parameter is the
memory full-parameter ZO exists to save. Every direction is multiplied by the trainable's z_mask (LoRA-FA:
frozen A factors are neither perturbed nor updated). ĝ below is (1/n) Σ_j g_j u_j, g_j = (L₊ⱼ − L₋ⱼ)/2ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from zoft.zo.noise import param_seed
from zoft.zo.trainable import Trainable, _flat_z


@dataclass
class Query:
    """The rows of one forward: row r evaluates θ + coef[r]·u[dir[r]]; dir[r] = −1 is θ itself."""

    u: torch.Tensor  # (m, D) directions over the flat parameter vector
    coef: list[float]
    dir: list[int]
    eps: float
    extra: dict = field(default_factory=dict)  # what update_ needs besides (HiZOO's z, LOZO's scale)


def _dtype(tr: Trainable) -> torch.dtype:
    return torch.promote_types(tr.tensors[0].dtype, torch.float32)  # float32, or float64 for float64 θ


def _gaussian(tr: Trainable, seeds: list[int]) -> torch.Tensor:
    """(n, D): ZO-SGD's z for each direction seed (masked)."""
    return torch.stack([_flat_z(tr, s) for s in seeds])


def _rademacher(tr: Trainable, seed: int) -> torch.Tensor:
    """(D,) ±1, from its own stream (index 1: apart from z's)."""
    gen = torch.Generator(device=tr.tensors[0].device)
    gen.manual_seed(param_seed(seed, 1))
    u = torch.randint(0, 2, (tr.numel(),), generator=gen, device=gen.device).float().mul_(2).sub_(1)
    return u if tr.z_mask is None else u.mul_(tr.z_mask)


def _pm(n: int, eps: float) -> tuple[list[float], list[int]]:
    """Rows θ + εu_1, θ − εu_1, θ + εu_2, … (ZO-SGD's layout)."""
    return [eps, -eps] * n, [j for j in range(n) for _ in (0, 1)]


def _spsa(losses: list[float], eps: float, first: int = 0) -> list[float]:
    """g_j = (L₊ⱼ − L₋ⱼ)/2ε for ± row pairs starting at row `first` (host floats: the step log's g)."""
    pairs = losses[first:]
    return [(pairs[2 * j] - pairs[2 * j + 1]) / (2 * eps) for j in range(len(pairs) // 2)]


def _spsa_t(L: torch.Tensor, eps: float, first: int = 0) -> torch.Tensor:
    """_spsa on the device: (n,) float64, the same IEEE operations in the same order."""
    pairs = L[first:]
    return (pairs[0::2] - pairs[1::2]) / (2 * eps)


def _losses(losses, tr: Trainable) -> torch.Tensor:
    """The row losses as a float64 tensor on θ's device, bitwise the same from the forward's tensor or the
    logged floats (module docstring)."""
    device = tr.tensors[0].device
    if torch.is_tensor(losses):
        return losses.to(device, torch.float64)
    return torch.tensor(losses, dtype=torch.float64).to(device)


def _combine(coefs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Σ_j coefs[j]·u_j, the coefficients computed in float64, then taken to u's dtype."""
    return (coefs.to(u.device, u.dtype)[:, None] * u).sum(0)


@torch.no_grad()
def _apply_(tr: Trainable, delta: torch.Tensor, lr: float, weight_decay: float) -> None:
    """θ ← θ·(1 − lr·wd) on the decayed tensors (decoupled), then θ += delta over the flat vector."""
    decayed = [t.data for t, d in zip(tr.tensors, tr.decay) if d]
    if weight_decay and decayed:
        torch._foreach_mul_(decayed, 1 - lr * weight_decay)
    flat = tr.flat_buffer()
    if flat is not None:
        flat.add_(delta.to(flat.dtype))
        return
    parts = delta.split([t.numel() for t in tr.tensors])
    torch._foreach_add_([t.data for t in tr.tensors], [d.view_as(t).to(t.dtype) for d, t in zip(parts, tr.tensors)])


class Method:
    """The shared shape of a method: ± Gaussian rows (2n a step), no state. Subclasses override."""

    name = ""
    state_bytes = 0  # bytes of state per trained parameter (float32)

    def __init__(self, zc, tr: Trainable, run_seed: int):
        self.zc, self.run_seed = zc, run_seed
        self.state: dict[str, torch.Tensor] = {}

    def rows(self, n: int) -> int:
        """Forward rows per step with n directions."""
        return 2 * n

    def query(self, tr: Trainable, seeds: list[int], step: int, eps: float) -> Query:
        return Query(_gaussian(tr, seeds).to(_dtype(tr)), *_pm(len(seeds), eps), eps)

    def grads(self, q: Query, losses: list[float]) -> list[float]:
        """The step's projected gradient per direction, from the read losses (logged; the guard checks it is finite)."""
        return _spsa(losses, q.eps)

    def g_t(self, q: Query, L: torch.Tensor) -> torch.Tensor:
        """grads on the device, from _losses' tensor."""
        return _spsa_t(L, q.eps)

    def ghat(self, q: Query, L: torch.Tensor) -> torch.Tensor:
        g = self.g_t(q, L)
        return _combine(g / len(g), q.u)

    def update_(self, tr: Trainable, q: Query, losses, lr: float, weight_decay: float) -> None:
        """θ and the state after the step whose rows gave `losses` (a device tensor, or the logged floats)."""
        raise NotImplementedError

    def replay_(self, tr: Trainable, record: dict, eps: float, weight_decay: float) -> None:
        """Repeat a logged step's update from its record (seeds, step, row losses, lr)."""
        q = self.query(tr, record["seeds"], record["step"], eps)
        self.update_(tr, q, record["losses"], record["lr"], weight_decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        for k, v in self.state.items():
            v.copy_(d[k])


class ZOMomentum(Method):
    """ZO-SGD with momentum (ZO-Bench, Zhang et al. 2024, arXiv 2402.11592, "ZO-SGD-MMT"):
    m ← β·m + ĝ;  θ ← θ − lr·m.  State: m (4 B/param). Forwards: 2n rows a step."""

    name, state_bytes = "zo-momentum", 4

    def __init__(self, zc, tr: Trainable, run_seed: int):
        super().__init__(zc, tr, run_seed)
        self.state = {"m": torch.zeros(tr.numel(), dtype=_dtype(tr), device=tr.tensors[0].device)}

    def update_(self, tr, q, losses, lr, weight_decay):
        m = self.state["m"].mul_(self.zc.momentum).add_(self.ghat(q, _losses(losses, tr)))
        _apply_(tr, -lr * m, lr, weight_decay)


class ZOAdam(Method):
    """ZO-Adam (ZO-Bench, arXiv 2402.11592; Adam, Kingma & Ba 2015, Alg. 1, on ĝ):
    m ← β₁m + (1−β₁)ĝ;  v ← β₂v + (1−β₂)ĝ²;  θ ← θ − lr·(m/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + eps_adam),
    t counting applied updates. State: m, v (8 B/param) and t. Forwards: 2n rows a step."""

    name, state_bytes = "zo-adam", 8

    def __init__(self, zc, tr: Trainable, run_seed: int):
        super().__init__(zc, tr, run_seed)
        dev, dt = tr.tensors[0].device, _dtype(tr)
        self.state = {"m": torch.zeros(tr.numel(), dtype=dt, device=dev),
                      "v": torch.zeros(tr.numel(), dtype=dt, device=dev), "t": torch.zeros((), dtype=torch.int64)}

    def update_(self, tr, q, losses, lr, weight_decay):
        b1, b2, st = self.zc.momentum, self.zc.beta2, self.state
        g = self.ghat(q, _losses(losses, tr))
        st["t"] += 1
        t = int(st["t"])
        st["m"].mul_(b1).add_(g, alpha=1 - b1)
        st["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (st["v"] / (1 - b2**t)).sqrt_().add_(self.zc.adam_eps)
        _apply_(tr, (st["m"] / (1 - b1**t)).div_(denom).mul_(-lr), lr, weight_decay)


class ZOSign(Method):
    """ZO-SignSGD ("signSGD via zeroth-order oracle", Liu et al., ICLR 2019; ZO-Bench, arXiv 2402.11592, ZO-SGD-Sign):
    θ ← θ − lr·sign(ĝ). No state (0 B/param). Forwards: 2n rows a step."""

    name = "zo-sign"

    def update_(self, tr, q, losses, lr, weight_decay):
        _apply_(tr, self.ghat(q, _losses(losses, tr)).sign().mul_(-lr), lr, weight_decay)


class FZOO(Method):
    """FZOO (Dang et al. 2025, arXiv 2506.09034, the update of its Alg. 1): N one-sided Rademacher directions
    and θ itself in one forward: L₀ = L(θ), Lᵢ = L(θ + εuᵢ), σ = std(L₁..L_N) (population form),
    θ ← θ − lr/(N·σ)·Σᵢ (Lᵢ − L₀)·uᵢ  (σ = 0: no move). N = --directions ≥ 2. No state (0 B/param).
    Forwards: N + 1 rows a step. Logged g: (Lᵢ − L₀)/ε."""

    name = "fzoo"

    def rows(self, n: int) -> int:
        return n + 1

    def query(self, tr, seeds, step, eps):
        u = torch.stack([_rademacher(tr, s) for s in seeds]).to(_dtype(tr))
        return Query(u, [0.0] + [eps] * len(seeds), [-1] + list(range(len(seeds))), eps)

    def grads(self, q, losses):
        return [(x - losses[0]) / q.eps for x in losses[1:]]

    def g_t(self, q, L):
        return (L[1:] - L[0]) / q.eps

    def update_(self, tr, q, losses, lr, weight_decay):
        L = _losses(losses, tr)
        li = L[1:]
        sigma, n = li.std(correction=0), len(li)
        coefs = torch.where(sigma > 0, (li - L[0]) * (-lr / (n * sigma)), torch.zeros_like(li))
        _apply_(tr, _combine(coefs, q.u), lr, weight_decay)


class HiZOO(Method):
    """HiZOO (Zhao et al. 2024, arXiv 2402.15173, Alg. 1), with a diagonal Σ kept as h = Σ⁻¹ (init 1):
    L₀ = L(θ), L±ⱼ = L(θ ± ε·Σ^{1/2}zⱼ);  θ ← θ − lr·(1/n)Σⱼ gⱼ·Σ^{1/2}zⱼ (the Σ the rows used);
    h ← (1−α)·h + α·(1/n)Σⱼ |L₊ⱼ + L₋ⱼ − 2L₀|/(2ε²)·(zⱼ² ⊙ h)  (α = --hizoo-alpha).
    State: h (4 B/param). Forwards: 2n + 1 rows a step."""

    name, state_bytes = "hizoo", 4

    def __init__(self, zc, tr: Trainable, run_seed: int):
        super().__init__(zc, tr, run_seed)
        self.state = {"h": torch.ones(tr.numel(), dtype=_dtype(tr), device=tr.tensors[0].device)}

    def rows(self, n: int) -> int:
        return 2 * n + 1

    def query(self, tr, seeds, step, eps):
        z = _gaussian(tr, seeds).to(_dtype(tr))
        coef, dirs = _pm(len(seeds), eps)
        return Query(z * self.state["h"].rsqrt(), [0.0] + coef, [-1] + dirs, eps, {"z": z})

    def grads(self, q, losses):
        return _spsa(losses, q.eps, first=1)

    def g_t(self, q, L):
        return _spsa_t(L, q.eps, first=1)

    def update_(self, tr, q, losses, lr, weight_decay):
        L = _losses(losses, tr)
        g, n, a = self.g_t(q, L), len(q.dir) // 2, self.zc.hizoo_alpha
        curv = (L[1::2] + L[2::2] - 2 * L[0]).abs() / (2 * q.eps**2) / n
        _apply_(tr, _combine(-lr * g / n, q.u), lr, weight_decay)
        h = self.state["h"]
        new = h * (1 - a) + a * _combine(curv, q.extra["z"].square()) * h
        h.copy_(new if tr.z_mask is None else torch.where(tr.z_mask > 0, new, h))  # frozen coordinates keep h


class LOZO(Method):
    """LOZO (Chen et al. 2024, arXiv 2410.07698, Alg. 1, the low-rank gradient estimator): each 2-D tensor
    W (m×k) is perturbed by U·Vᵀ, U (m×r) drawn every step from the direction seed, V (k×r) from
    (run seed, step // ν); other tensors by ordinary z. gⱼ as ZO-SGD's; θ ← θ − lr·(1/n)Σⱼ gⱼ·UⱼVᵀ/r
    (z for the others). r = --lozo-rank, ν = --lozo-interval. V is a pure function of (run seed, step // ν),
    never state: a resume mid-interval redraws exactly the V the run used (LOZO's own code resampled it
    lazily and lost it on restart). No state (0 B/param). Forwards: 2n rows a step."""

    name = "lozo"

    def __init__(self, zc, tr: Trainable, run_seed: int):
        super().__init__(zc, tr, run_seed)
        self.memo: tuple[int, list] | None = None  # (interval, V per tensor): a cache of a pure function

    def v_factors(self, tr: Trainable, step: int) -> list[torch.Tensor | None]:
        k = step // self.zc.lozo_interval
        if self.memo is None or self.memo[0] != k:
            seed, vs = param_seed(self.run_seed, (1 << 41) + k), []
            for i, t in enumerate(tr.tensors):
                vs.append(_randn((t.shape[1], self.zc.lozo_rank), param_seed(seed, i), t.device) if t.dim() == 2 else None)
            self.memo = (k, vs)
        return self.memo[1]

    def query(self, tr, seeds, step, eps):
        vs, r, dt = self.v_factors(tr, step), self.zc.lozo_rank, _dtype(tr)
        us = []
        for s in seeds:
            parts = []
            for i, (t, v) in enumerate(zip(tr.tensors, vs)):
                if v is None:
                    parts.append(_randn((t.numel(),), param_seed(s, 2 + i), t.device))
                else:
                    parts.append((_randn((t.shape[0], r), param_seed(s, 2 + i), t.device).to(dt) @ v.T.to(dt)).reshape(-1))
            u = torch.cat([p.to(dt) for p in parts])
            us.append(u if tr.z_mask is None else u * tr.z_mask)
        scale = torch.cat([torch.full((t.numel(),), 1 / r if t.dim() == 2 else 1.0, dtype=dt, device=t.device)
                           for t in tr.tensors])
        return Query(torch.stack(us).to(dt), *_pm(len(seeds), eps), eps, {"scale": scale})

    def update_(self, tr, q, losses, lr, weight_decay):
        g = self.g_t(q, _losses(losses, tr))
        _apply_(tr, _combine(-lr * g / len(g), q.u) * q.extra["scale"], lr, weight_decay)


def _randn(shape: tuple, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


class SparseMeZO(Method):
    """Sparse-MeZO (Liu et al. 2024, arXiv 2402.15751, Alg. 1): perturb and update only small-magnitude
    entries: per tensor, mask = 1[|θ| ≤ h] with h the ⌈(1−s)·numel⌉-th smallest |θ| (s = --sparsity, the
    fraction left out), recomputed from θ each step; z̃ⱼ = mask ⊙ zⱼ in the rows and in θ ← θ − lr·(1/n)Σⱼ gⱼz̃ⱼ.
    No state (0 B/param: the mask is a function of θ). Forwards: 2n rows a step."""

    name = "sparse-mezo"

    def query(self, tr, seeds, step, eps):
        masks = []
        for t in tr.tensors:
            a = t.detach().abs().reshape(-1)
            k = max(1, math.ceil((1 - self.zc.sparsity) * a.numel()))
            masks.append((a <= a.kthvalue(k).values).to(_dtype(tr)))
        return Query(_gaussian(tr, seeds).to(_dtype(tr)) * torch.cat(masks), *_pm(len(seeds), eps), eps)

    def update_(self, tr, q, losses, lr, weight_decay):
        _apply_(tr, self.ghat(q, _losses(losses, tr)).mul_(-lr), lr, weight_decay)


class ConMeZO(Method):
    """ConMeZO (Behric et al. 2025, arXiv 2511.02757): directions drawn in a cone of half-angle φ around the
    momentum m: u = √D·(cos φ·m̂ + sin φ·ξ⊥/‖ξ⊥‖), ξ ~ N(0, I) from the direction seed, ξ⊥ its part
    orthogonal to m̂ (D: the trained coordinates; m = 0 at the start: u = ξ). gⱼ as ZO-SGD's, θ ← θ − lr·ĝ,
    m ← β·m + (1−β)·ĝ. φ = --cone-angle (degrees), β = --momentum. State: m (4 B/param).
    Forwards: 2n rows a step. (The cone's form here is read from the paper's abstract and §3; check it
    against its Alg. 1 before quoting numbers.)"""

    name, state_bytes = "conmezo", 4

    def __init__(self, zc, tr: Trainable, run_seed: int):
        super().__init__(zc, tr, run_seed)
        self.state = {"m": torch.zeros(tr.numel(), dtype=_dtype(tr), device=tr.tensors[0].device)}

    def query(self, tr, seeds, step, eps):
        xi, m = _gaussian(tr, seeds).to(_dtype(tr)), self.state["m"]
        norm = torch.linalg.vector_norm(m)  # a device scalar: the cone is chosen on the device (m = 0: u = ξ)
        d = tr.numel() if tr.z_mask is None else tr.z_mask.sum()
        mh, phi = m / norm, math.radians(self.zc.cone_angle)
        perp = xi - (xi @ mh)[:, None] * mh[None]
        perp = perp / torch.linalg.vector_norm(perp, dim=1, keepdim=True)
        cone = (math.cos(phi) * mh[None] + math.sin(phi) * perp) * (d ** 0.5)
        return Query(torch.where(norm > 0, cone, xi), *_pm(len(seeds), eps), eps)

    def update_(self, tr, q, losses, lr, weight_decay):
        g = self.ghat(q, _losses(losses, tr))
        _apply_(tr, -lr * g, lr, weight_decay)
        self.state["m"].mul_(self.zc.momentum).add_(g, alpha=1 - self.zc.momentum)


METHODS: dict[str, type[Method]] = {c.name: c for c in (ZOMomentum, ZOAdam, ZOSign, FZOO, HiZOO, LOZO, SparseMeZO,
                                                         ConMeZO)}


def make_method(zc, tr: Trainable, run_seed: int) -> Method | None:
    """The method --optimizer names, for trainable `tr`; None for zo-sgd (zoft.zo.update's own path)."""
    cls = METHODS.get(zc.optimizer)
    return None if cls is None else cls(zc, tr, run_seed)


def update_method_(method: Method, tr: Trainable, q: Query, losses, lr: float, weight_decay: float) -> None:
    """One method step's update (the training loop's seam for it, as sgd_update_ is ZO-SGD's): losses are the
    forward's device tensor (queued, pipelined) or the logged floats."""
    method.update_(tr, q, losses, lr, weight_decay)
