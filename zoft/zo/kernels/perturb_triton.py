"""Seeded perturbations in one pass over memory: x ← decay·x + Σ_j c_j·z_j, z_j = Philox(seed_j, index).

MeZO touches every trained parameter four times a step (+εz, −2εz, +εz, update). The torch path
(``zoft.zo.noise``) generates z chunk by chunk with a ``torch.Generator`` and then adds it: per chunk one
write of z and two reads, plus the launch of each. Here one kernel reads x once, computes z in registers
from a counter-based generator (Philox via ``tl.randn4x(seed, counters)``, as in Triton's low-memory dropout
tutorial; element i takes lane i % 4 of counter i // 4, so one Philox call serves four elements) and
writes x once. z is a pure function of (seed, element index): no chunk size, no generator
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
z's Box-Muller transform uses the GPU's approximate special functions (inline PTX), so the kernels
need an NVIDIA GPU; Triton's interpreter (``TRITON_INTERPRET=1``) cannot run them.

Where they are used: ``zoft.zo.perturb_``/``sgd_update_`` (full mode's in-place passes and its update)
when the run's z backend is "triton" (``zoft.session.resolve_z_backend``: CUDA with Triton installed).
z differs between the torch and Triton backends (as it already differs between CPU and CUDA generators),
so the step log records the backend and replay uses the same one.

Full mode's rows perturbation (``zoft.zo.perturbers.FullRows``) adds two more calls, with the seed read
from a device tensor so that a CUDA graph replays them with each step's seeds:

    perturbed_pair_triton(w, seed_t, eps)            (w + εz, w − εz), each rounded once to w's dtype
    perturbed_rows_triton(w, idx, seed_t, eps)       the same for rows idx of a 2-D w (embeddings, head)
    update_sr_triton_(t, seeds, coefs, decay, sr_seed)   the update with seeded stochastic rounding

Stochastic rounding (bf16, fp16): the float32 result rounds up or down to a neighbour of t's dtype
with probabilities that make it exact in expectation; the draw is Philox(sr_seed, index), so the
rounding, like z, is a pure function of (seed, index) and a replay repeats it bitwise.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path (zoft.zo.noise) needs none of this
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
BLOCK = 1024  # elements per program; memory-bound, so the exact value matters little
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEED_LIMIT = 1 << 63  # seeds are non-negative int64 (zoft.zo.noise.param_seed gives 63 bits)


if triton is not None:

    # The GPU's special-function unit (PTX .approx): a few cycles where libdevice's accurate log, sqrt, sin
    # and cos take tens of instructions; errors ~1e-6 relative, far below anything z needs.
    @triton.jit
    def _lg2(x):
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _sqrt(x):
        return tl.inline_asm_elementwise("sqrt.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)

    @triton.jit
    def _sin(x):
        return tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _cos(x):
        return tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _normal4(seed, g):
        """Four standard normals per counter g: Philox4x32-10, then Box-Muller on the two uniform pairs."""
        i0, i1, i2, i3 = tl.randint4x(seed, g)
        u0 = tl.maximum(tl.random.uint_to_uniform_float(i0), 1.0e-7)
        u2 = tl.maximum(tl.random.uint_to_uniform_float(i2), 1.0e-7)
        t1 = tl.random.uint_to_uniform_float(i1) * 6.283185307179586 - 3.141592653589793  # [-π, π): .approx range
        t3 = tl.random.uint_to_uniform_float(i3) * 6.283185307179586 - 3.141592653589793
        r0 = _sqrt(-1.3862943611198906 * _lg2(u0))  # sqrt(−2 ln u) = sqrt(−2 ln2 · log2 u)
        r2 = _sqrt(-1.3862943611198906 * _lg2(u2))
        return r0 * _cos(t1), r0 * _sin(t1), r2 * _cos(t3), r2 * _sin(t3)

    @triton.jit
    def _z_block(seed, start, BLOCK: tl.constexpr):
        """z for elements start … start + BLOCK − 1 (start a multiple of 4): element i is lane i % 4 of
        the four normals _normal4 gives at counter i // 4, so one Philox call and two Box-Muller pairs
        serve four elements (tl.randn spends a whole call, with accurate log and cos, on one)."""
        g = start // 4 + tl.arange(0, BLOCK // 4)
        n0, n1, n2, n3 = _normal4(seed, g)
        return tl.interleave(tl.interleave(n0, n2), tl.interleave(n1, n3))

    @triton.jit
    def _z_at(seed, idx):
        """z at arbitrary element indices: the values _z_block gives there."""
        n0, n1, n2, n3 = _normal4(seed, idx // 4)
        lane = idx % 4
        return tl.where(lane == 0, n0, tl.where(lane == 1, n1, tl.where(lane == 2, n2, n3)))

    @triton.jit
    def _bits_block(seed, start, BLOCK: tl.constexpr):
        """32 random bits per element of the block, four elements per Philox call (4 rounds: the
        rounding needs uniform bits, not a generator that resists statistical attack)."""
        g = start // 4 + tl.arange(0, BLOCK // 4)
        a, b, c, d = tl.randint4x(seed, g, 4)
        return tl.interleave(tl.interleave(a, c), tl.interleave(b, d))

    @triton.jit
    def _axpz_kernel(x_ptr, n_elements, seed, scale, decay, BLOCK: tl.constexpr):
        """x ← decay·x + scale·z, z[i] = Philox(seed, i); one read and one write of x."""
        pid = tl.program_id(0).to(tl.int64)  # int64 offsets: tensors past 2³¹ elements, same stream below
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        z = _z_block(seed, pid * BLOCK, BLOCK)
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
            acc = acc + coef * _z_block(seed, pid * BLOCK, BLOCK)
        tl.store(x_ptr + offs, acc.to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pair_kernel(w_ptr, p_ptr, m_ptr, n_elements, seed_ptr, eps, BLOCK: tl.constexpr):
        """p ← w + ε·z, m ← w − ε·z (z[i] = Philox(seed, i)), in float32, each rounded once on store."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
        z = eps * _z_block(tl.load(seed_ptr), pid * BLOCK, BLOCK)
        tl.store(p_ptr + offs, (w + z).to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offs, (w - z).to(m_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _pair_rows_kernel(w_ptr, idx_ptr, p_ptr, m_ptr, D, seed_ptr, eps, BLOCK: tl.constexpr):
        """Rows idx of a (V, D) w: p[r] ← w[idx[r]] + ε·z, m[r] ← w[idx[r]] − ε·z, z at w's element index."""
        r = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < D
        src = tl.load(idx_ptr + r).to(tl.int64) * D + cols
        w = tl.load(w_ptr + src, mask=mask).to(tl.float32)
        z = eps * _z_at(tl.load(seed_ptr), src)
        tl.store(p_ptr + r * D + cols, (w + z).to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + r * D + cols, (w - z).to(m_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_rounded(ptr, offs, mask, acc, sr_seed, start, HALF: tl.constexpr, BLOCK: tl.constexpr):
        """Store float32 acc (elements start … start + BLOCK − 1 of a tensor) at ptr + offs in ptr's dtype.
        HALF 0: to nearest. 1 (bfloat16): add 16 random bits below the kept ones, then truncate. 2 (float16):
        round toward zero, then up one ulp with probability residual / ulp. The random bits are
        Philox(sr_seed, element index): the torch path's arithmetic (zoft.zo.noise.round_stochastic), its
        own stream."""
        if HALF == 0:
            tl.store(ptr + offs, acc.to(ptr.dtype.element_ty), mask=mask)
        elif HALF == 1:
            r = (_bits_block(sr_seed, start, BLOCK) & 0xFFFF).to(tl.int32)
            out = ((acc.to(tl.int32, bitcast=True) + r) & -65536).to(tl.float32, bitcast=True)
            tl.store(ptr + offs, out.to(tl.bfloat16), mask=mask)
        else:
            t = acc.to(tl.float16, fp_downcast_rounding="rtz")
            up = (t.to(tl.int16, bitcast=True) + 1).to(tl.int16).to(tl.float16, bitcast=True)
            tf = t.to(tl.float32)
            p = (acc - tf) / (up.to(tl.float32) - tf)
            u = (_bits_block(sr_seed, start, BLOCK) >> 8).to(tl.float32) * (1.0 / 16777216.0)  # [0, 1)
            tl.store(ptr + offs, tl.where(u < p, up, t), mask=mask)

    @triton.jit
    def _update_sr_kernel(x_ptr, n_elements, seeds_ptr, coefs_ptr, n_dirs, decay, sr_seed,
                          HALF: tl.constexpr, BLOCK: tl.constexpr):
        """x ← SR(decay·x + Σ_j coefs[j]·z_j): the update of a half-precision tensor (HALF 1 bfloat16,
        2 float16), stochastically rounded with Philox(sr_seed, i) (_store_rounded)."""
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        acc = tl.load(x_ptr + offs, mask=mask).to(tl.float32) * decay
        for j in range(n_dirs):
            acc = acc + tl.load(coefs_ptr + j) * _z_block(tl.load(seeds_ptr + j), pid * BLOCK, BLOCK)
        _store_rounded(x_ptr, offs, mask, acc, sr_seed, pid * BLOCK, HALF, BLOCK)

    @triton.jit
    def _update_many_kernel(ptrs_ptr, map_ptr, starts_ptr, numels_ptr, ints_ptr, floats_ptr, n_tensors, n_dirs,
                            ELT: tl.constexpr, HALF: tl.constexpr, SUB: tl.constexpr, BLOCK: tl.constexpr):
        """The update of many tensors of one dtype in one launch: program b does SUB blocks of tensor
        k = map[b] (each tensor's programs start at starts[k]), with _axpz_multi_kernel's (HALF 0) or
        _update_sr_kernel's (HALF 1, 2) arithmetic. ints: the (tensors, directions) seed table, then each
        tensor's rounding seed; floats: each tensor's decay, then the directions' coefficients."""
        b = tl.program_id(0)
        k = tl.load(map_ptr + b)
        base = tl.load(ptrs_ptr + k).to(tl.pointer_type(ELT))
        n = tl.load(numels_ptr + k)
        decay = tl.load(floats_ptr + k)
        sr = tl.load(ints_ptr + n_tensors * n_dirs + k)
        for sub in tl.static_range(SUB):
            local = ((b - tl.load(starts_ptr + k)).to(tl.int64) * SUB + sub) * BLOCK
            offs = local + tl.arange(0, BLOCK)
            mask = offs < n
            acc = tl.load(base + offs, mask=mask).to(tl.float32) * decay
            for j in range(n_dirs):
                acc = acc + tl.load(floats_ptr + n_tensors + j) * _z_block(tl.load(ints_ptr + k * n_dirs + j),
                                                                          local, BLOCK)
            _store_rounded(base, offs, mask, acc, sr, local, HALF, BLOCK)


SUB = 4  # blocks per program of the many-tensor update: fewer programs, each a larger share of one tensor


class UpdatePlan:
    """The fixed part of a many-tensor update: each tensor's address, first block and size, on the device.
    Made once per set of tensors (zoft.zo keeps one per dtype); `valid` notices re-pointed tensors."""

    def __init__(self, tensors: list[torch.Tensor]):
        for t in tensors:
            _check(t)
        self.tensors = tensors
        self.dtype = tensors[0].dtype
        if any(t.dtype != self.dtype for t in tensors):
            raise ValueError("UpdatePlan takes tensors of one dtype")
        self.ptrs = [t.data_ptr() for t in tensors]
        programs = [triton.cdiv(t.numel(), BLOCK * SUB) for t in tensors]
        starts = [0]
        for nb in programs:
            starts.append(starts[-1] + nb)
        self.n_blocks = starts[-1]
        dev = tensors[0].device
        self.ptrs_t = torch.tensor(self.ptrs, dtype=torch.int64, device=dev)
        self.starts_t = torch.tensor(starts[:-1], dtype=torch.int64, device=dev)
        self.map_t = torch.repeat_interleave(torch.arange(len(tensors), dtype=torch.int32),
                                             torch.tensor(programs)).to(dev)  # program -> tensor
        self.numels_t = torch.tensor([t.numel() for t in tensors], dtype=torch.int64, device=dev)

    def valid(self, tensors: list[torch.Tensor]) -> bool:
        return len(tensors) == len(self.ptrs) and all(t.data_ptr() == p for t, p in zip(tensors, self.ptrs))

    @torch.no_grad()
    def run(self, ints: torch.Tensor, floats: torch.Tensor, n_dirs: int) -> None:
        """ints: int64 [seed table (tensors × n_dirs) | rounding seeds (tensors)]; floats: float32
        [decays (tensors) | coefficients (n_dirs)], both on the device."""
        half = {torch.bfloat16: 1, torch.float16: 2}.get(self.dtype, 0)
        elt = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[self.dtype]
        if self.n_blocks:
            _update_many_kernel[(self.n_blocks,)](self.ptrs_t, self.map_t, self.starts_t, self.numels_t, ints, floats,
                                                  len(self.ptrs), n_dirs, ELT=elt, HALF=half, SUB=SUB, BLOCK=BLOCK)


def _check(t: torch.Tensor) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("zoft.zo.kernels.perturb_triton needs triton (pip install triton); use zoft.zo.noise instead")
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


@torch.no_grad()
def update_sr_triton_(t: torch.Tensor, seeds: torch.Tensor, coefs: torch.Tensor, decay: float, sr_seed: int) -> None:
    """t ← SR(decay·t + Σ_j coefs[j]·z(seeds[j])) for a bfloat16 or float16 t; seeds (n,) int64 and coefs
    (n,) float32 are device tensors (coefs may come from g still on the device: nothing waits for it)."""
    flat = _check(t)
    if t.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"stochastic rounding is for bfloat16 and float16 tensors, got {t.dtype}")
    if flat.numel():
        _update_sr_kernel[_grid(flat.numel())](flat, flat.numel(), seeds, coefs, seeds.numel(), float(decay),
                                               _check_seed(sr_seed), HALF=1 if t.dtype == torch.bfloat16 else 2,
                                               BLOCK=BLOCK)


def perturbed_pair_triton(w: torch.Tensor, seed: torch.Tensor, eps: float, out: tuple | None = None):
    """(w + ε·z, w − ε·z) in w's dtype, z = Philox(seed, index); seed: a one-element int64 device tensor."""
    flat = _check(w)
    p, m = out if out is not None else (torch.empty_like(w), torch.empty_like(w))
    if flat.numel():
        _pair_kernel[_grid(flat.numel())](flat, p, m, flat.numel(), seed, float(eps), BLOCK=BLOCK)
    return p, m


def perturbed_rows_triton(w: torch.Tensor, idx: torch.Tensor, seed: torch.Tensor, eps: float):
    """Rows idx of a 2-D w perturbed both ways: (w[idx] + ε·z[idx], w[idx] − ε·z[idx]), z indexed as w's
    elements, so the rows equal those of perturbed_pair_triton(w, …) without generating the others."""
    _check(w)
    D = w.shape[1]
    idx = idx.reshape(-1).contiguous()
    p = torch.empty(idx.numel(), D, dtype=w.dtype, device=w.device)
    m = torch.empty_like(p)
    if idx.numel():
        _pair_rows_kernel[(idx.numel(), triton.cdiv(D, BLOCK))](w, idx, p, m, D, seed, float(eps), BLOCK=BLOCK)
    return p, m


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
