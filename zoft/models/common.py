"""Pieces both native model families share: masked attention over packed rows, and the model protocol.

A native model keeps Hugging Face's parameter names (``model.layers.3.self_attn.q_proj.weight``), so
loading a checkpoint is a short name map, and LoRA module paths are the ones PEFT writes.

The engine drives a model one stage at a time instead of calling ``forward``:

    h = model.embed(ids, pos)                 # (N, L, D)
    ctx = model.position_context(pos)         # RoPE cos/sin for Llama, None for OPT
    for layer in model.blocks: h = layer(h, mask, ctx, rows=rows)
    h = model.norm_out(h)                     # final norm (+ OPT's project_out)
    logits = h @ model.lm_head_weight.T

That split is what lets it run the frozen lower layers once and the perturbed upper layers once per
perturbation row, and compute logits only where the loss reads them.

Every stage also takes ``rows``, a ``Rows``: how the step's perturbations apply. The batch is stacked
``rows.P`` times along dim 0 (row block p holds perturbation p), and each parametrised layer runs through
``rows.linear`` / ``rows.norm`` / ``rows.embedding`` / ``rows.logits``. ``Rows`` itself is the
unperturbed forward (evaluation, frozen layers, in-place perturbations); ``zoft.zo.perturbers`` holds the
LoRA and full-parameter ones. Nothing is written onto modules and no forward is replaced: a layer sees
its perturbation only through the argument.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from zoft.engine.offload import head_logits, stream_blocks
from zoft.lora import LoRALinear


class Rows:
    """P unperturbed copies of the batch: each layer applied as it is. Subclasses (zoft.zo.perturbers)
    give row block p its own perturbed parameters."""

    perturbs_embeddings = False  # True: embed() must see the P stacked copies of the ids (zoft.engine)
    graphable = True  # a CUDA graph of these rows replays right when graph_tensor() is refilled

    def __init__(self, P: int = 1):
        self.P = P

    def linear(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return mod(x)

    def update(self, mod: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y = mod's base output for x (a slice of a fused GEMM's) plus what mod adds to it (LoRA)."""
        return mod.add_update(x, y) if isinstance(mod, LoRALinear) else y

    def fusable(self, mods: list[nn.Module]) -> bool:
        """Whether these layers' base weights are the same for every row (one fused GEMM may serve)."""
        return True

    def norm(self, mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return mod(x)

    def embedding(self, emb: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        return emb(ids)

    def head_rows(self, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The LM head's rows idx: (M, D), or (P, M, D) when they differ per row block."""
        return w[idx]

    def logits(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.linear(h.to(w.dtype), w)

    def prefix(self, attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The prefix keys and values an attention module puts in front of its own (prefix tuning,
        zoft.prefix): (R, kv_heads, P_v, head_dim) each, R = 1 or one per row block; None: no prefix."""
        slot = getattr(attn, "zoft_prefix", None)
        return None if slot is None else self.prefix_kv(slot)

    def prefix_kv(self, slot) -> tuple[torch.Tensor, torch.Tensor]:
        """A zoft.prefix.PrefixSlot's keys and values for these rows: θ itself, shared by every row."""
        return slot.kv()

    def graph_tensor(self) -> torch.Tensor | None:
        """The device tensor that carries this step's perturbation into a CUDA graph (None: nothing)."""
        return None

    def over(self, t: torch.Tensor) -> Rows:
        """These rows with graph_tensor() replaced by t (a graph's static copy of it)."""
        return self


PLAIN = Rows(1)


GPU_MASKED_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

try:  # flash attention's variable-length kernel (torch >= 2.10); its causal flag changed name in 2.11
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn

    _CAUSAL = ({"window_size": (-1, 0)} if "window_size" in inspect.signature(_varlen_attn).parameters
               else {"is_causal": True})
except ImportError:  # pragma: no cover - older torch
    _varlen_attn = None


def flash_varlen_available(device: torch.device | str) -> bool:
    """Whether flash's variable-length kernel runs on `device`: CUDA with compute capability >= 8.0
    (Ampere or newer; flash attention has no kernels for older GPUs)."""
    device = torch.device(device)
    return (_varlen_attn is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 8)


@dataclass
class Varlen:
    """Packed attention as a list of causal sequences, for flash attention's variable-length kernel.

    The packed tokens (all rows, flattened: index r·L + t) split into contiguous query sequences: an
    example's prompt with its first candidate, then each further candidate alone, then each row's tail
    padding. Query sequence s attends, causally and aligned at the end, to its key sequence, the flat
    tokens ``kidx[cu_k[s]:cu_k[s+1]]``: the sequence itself, and for a further candidate the prompt's
    tokens before it. So each candidate sees its prompt and itself, exactly as the block-diagonal mask
    says, and the kernel computes only those scores: no L×L mask, no work across examples.

    Shapes are padded for CUDA graphs (zero-length sequences at the end, unused keys after cu_k[-1]);
    ``max_q``/``max_k`` are bucketed upper bounds of the sequence lengths.
    """

    cu_q: torch.Tensor  # (S+1,) int32
    cu_k: torch.Tensor  # (S+1,) int32
    kidx: torch.Tensor  # (Tk,) int64: flat token index of each key
    max_q: int
    max_k: int
    tokens: int  # flat tokens of one copy of the packs (N·L)
    identity: bool = False  # every key sequence is its query sequence: kidx = arange(tokens), no gather

    def repeat(self, rows: int) -> Varlen:
        """The plan for `rows` perturbation copies of the packs stacked along dim 0."""
        if rows == 1:
            return self
        dev, T, Tk = self.cu_q.device, self.tokens, self.kidx.numel()
        p = torch.arange(rows, device=dev, dtype=torch.int32)[:, None]
        cu_q = torch.cat([(self.cu_q[None, :-1] + p * T).flatten(), self.cu_q[-1:] + (rows - 1) * T])
        cu_k = torch.cat([(self.cu_k[None, :-1] + p * Tk).flatten(), self.cu_k[-1:] + (rows - 1) * Tk])
        kidx = (self.kidx[None, :] + p.long() * T).flatten()
        return Varlen(cu_q, cu_k, kidx, self.max_q, self.max_k, rows * T, self.identity)

    def tensors(self) -> list[torch.Tensor]:
        return [self.cu_q, self.cu_k, self.kidx]

    def with_tensors(self, cu_q: torch.Tensor, cu_k: torch.Tensor, kidx: torch.Tensor) -> Varlen:
        """This plan over other tensors of the same shapes (a CUDA graph's static copies of tensors())."""
        return replace(self, cu_q=cu_q, cu_k=cu_k, kidx=kidx)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        N, H, L, hd = q.shape
        qf = q.transpose(1, 2).reshape(N * L, H, hd)  # a view when q came from (N, L, H, hd)
        kf = k.transpose(1, 2).reshape(N * L, k.shape[1], hd)
        vf = v.transpose(1, 2).reshape(N * L, v.shape[1], hd)
        if not self.identity:  # a further candidate's keys: its prompt's, then its own
            kf, vf = kf.index_select(0, self.kidx), vf.index_select(0, self.kidx)
        if kf.shape[1] != H:  # grouped-query attention
            kf, vf = kf.repeat_interleave(H // kf.shape[1], dim=1), vf.repeat_interleave(H // vf.shape[1], dim=1)
        if q.is_cuda and _varlen_attn is not None and q.dtype in (torch.float16, torch.bfloat16):
            y = _varlen_attn(qf, kf, vf, self.cu_q, self.cu_k, self.max_q, self.max_k, **_CAUSAL)
        else:
            y = _varlen_reference(qf, kf, vf, self.cu_q.tolist(), self.cu_k.tolist())
        return y.view(N, L, H, hd).transpose(1, 2)


def _varlen_reference(q, k, v, cu_q: list[int], cu_k: list[int]) -> torch.Tensor:
    """The variable-length kernel's semantics in plain torch, one sequence at a time (CPU, tests)."""
    out = torch.zeros_like(q)
    for s in range(len(cu_q) - 1):
        a, b, c, d = cu_q[s], cu_q[s + 1], cu_k[s], cu_k[s + 1]
        if b == a:
            continue
        lq, lk = b - a, d - c
        causal = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)  # aligned at the end
        out[a:b] = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[c:d].transpose(0, 1), v[c:d].transpose(0, 1), attn_mask=causal
        ).transpose(0, 1)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """Scaled dot-product attention. q: (N, H, L, hd), k/v: (N, Hkv, L, hd), mask: (N|1, 1, L, L) bool.

    ``mask`` is True where a query may attend. None means plain causal; False means no mask (a decode
    step: one new query attends to every cached key); a ``Varlen`` plan runs packed sequences through
    the variable-length kernel.
    """
    if isinstance(mask, Varlen):
        return mask.attend(q, k, v)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: share each K/V head across its query group
        rep = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if mask is False:
        return F.scaled_dot_product_attention(q, k, v)
    if mask.shape[0] != q.shape[0]:  # mask is per pack; rows are perturbation copies of the packs
        mask = mask.repeat(q.shape[0] // mask.shape[0], 1, 1, 1)
    if q.is_cuda:  # cuDNN's SDPA builds a plan per new shape (tens of ms); the others don't
        with sdpa_kernel(GPU_MASKED_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def add_prefix(kv: tuple[torch.Tensor, torch.Tensor] | None, k: torch.Tensor, v: torch.Tensor, mask):
    """k, v (N, Hkv, Lk, hd) with a prefix's keys and values (R, Hkv, P_v, hd) in front, row block r of
    the N rows (N/R consecutive rows) getting prefix r; the mask widened so that every query attends to the
    whole prefix (packed segments and padding too: a prefix belongs to the row, not to a segment).
    kv None: unchanged."""
    if kv is None:
        return k, v, mask
    N, Lk = k.shape[0], k.shape[2]
    pk, pv = (expand_rows(t, N).to(k.dtype) for t in kv)
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    if mask is False:  # a decode step: every key visible anyway
        return k, v, mask
    if isinstance(mask, Varlen):
        raise ValueError("prefix tuning runs attention with masks; the engine must not build a varlen plan")
    if mask is None:  # plain causal over Lk tokens
        mask = torch.ones(Lk, Lk, dtype=torch.bool, device=k.device).tril()[None, None]
    ones = torch.ones(*mask.shape[:3], pk.shape[2], dtype=torch.bool, device=mask.device)
    return k, v, torch.cat([ones, mask], dim=-1)


def expand_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(R, ...) -> (n, ...): entry r repeated for n/R consecutive rows (rows stack perturbation blocks)."""
    if t.shape[0] == n:
        return t
    return t[:, None].expand(t.shape[0], n // t.shape[0], *t.shape[1:]).reshape(n, *t.shape[1:])


def extend_cache(cache: dict | None, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append this step's K/V (N, H, L, hd) to the layer's cache and return the whole sequence's."""
    if cache is None:
        return k, v
    if "k" in cache:
        k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
    cache["k"], cache["v"] = k, v
    return k, v


class Fused:
    """Frozen linear layers that read the same input (q/k/v; Llama's gate/up), run as one GEMM.

    Their weights (and biases) are concatenated once and each layer's parameter becomes a view of its
    slice, so nothing is stored twice and anything written into a weight in place (merging an adapter)
    reaches the fused copy. A LoRA wrapper adds its update to its slice of the output. ``fuse``
    refuses layers that are trained in full (their parameters may be re-pointed at a flat buffer), of
    other types or mixed dtypes; if a weight is re-pointed later (offloading, ``.float()``),
    ``__call__`` notices and runs the layers one by one."""

    def __init__(self, mods: list[nn.Module], weight: torch.Tensor, bias: torch.Tensor | None, sizes: list[int]):
        self.mods, self.weight, self.bias, self.sizes = mods, weight, bias, sizes
        self.ptrs = _ptrs(mods)  # mods: the plain nn.Linear layers

    @staticmethod
    def fuse(mods: list[nn.Module]) -> Fused | None:
        bases = [_base(m) for m in mods]
        ws = [b.weight for b in bases]
        if (any(type(b) is not nn.Linear for b in bases) or any(w.requires_grad for w in ws)
                or len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1):
            return None
        with_bias = [b.bias is not None for b in bases]
        if any(with_bias) and not all(with_bias):
            return None
        weight = torch.cat([w.data for w in ws])
        bias = torch.cat([b.bias.data for b in bases]) if all(with_bias) else None
        sizes, off = [], 0
        for b in bases:
            n = b.weight.shape[0]
            b.weight.data = weight[off : off + n]
            if bias is not None:
                b.bias.data = bias[off : off + n]
            sizes.append(n)
            off += n
        return Fused([_base(m) for m in mods], weight, bias, sizes)

    def valid_for(self, mods: list[nn.Module]) -> bool:
        """Still the same layers (not replaced, e.g. by a LoRA wrapper) over the same weight and bias storage."""
        return (len(mods) == len(self.mods) and all(a is b or (isinstance(a, LoRALinear) and a.base is b)
                                                    for a, b in zip(mods, self.mods, strict=True))
                and _ptrs([_base(m) for m in mods]) == self.ptrs)

    def __call__(self, mods: list[nn.Module], x: torch.Tensor, rows: Rows = PLAIN) -> list[torch.Tensor]:
        ys = F.linear(x, self.weight, self.bias).split(self.sizes, -1)
        return [rows.update(m, x, y) for m, y in zip(mods, ys, strict=True)]


def _ptrs(linears: list[nn.Module]) -> list[int]:
    return [p.data_ptr() for m in linears for p in (m.weight, m.bias) if p is not None]


def _base(m: nn.Module) -> nn.Module:
    return m.base if isinstance(m, LoRALinear) else m


def run_linears(fused: Fused | None, mods: list[nn.Module], x: torch.Tensor, rows: Rows = PLAIN) -> list[torch.Tensor]:
    """Each layer of `mods` applied to x: as one GEMM where `fused` (Fused.fuse) still describes them and
    their base weights are the same for every row."""
    if fused is not None and rows.fusable(mods) and fused.valid_for(mods):
        return fused(mods, x, rows)
    return [rows.linear(m, x) for m in mods]


RELU_EPILOGUE = True  # bench/profile_step.py --fuse 0 turns it off to measure what it saves


def linear_relu(lin: nn.Module, x: torch.Tensor, rows: Rows = PLAIN) -> torch.Tensor:
    """relu(lin(x)). For a plain nn.Linear on CUDA without autograd, the bias and the ReLU run in the
    GEMM's epilogue (cuBLASLt RELU_BIAS) instead of a separate pass over the (tokens × ffn) output;
    not where the rows perturb lin's own weights."""
    if (RELU_EPILOGUE and type(lin) is nn.Linear and x.is_cuda and lin.bias is not None and x.dtype == lin.weight.dtype
            and not torch.is_grad_enabled() and rows.fusable([lin])):
        y = torch._addmm_activation(lin.bias, x.reshape(-1, x.shape[-1]), lin.weight.t())
        return y.view(*x.shape[:-1], y.shape[-1])
    return F.relu(rows.linear(lin, x))


def causal_mask(n: int, length: int, device: torch.device | str) -> torch.Tensor:
    """(n, 1, L, L) lower-triangular bool mask."""
    m = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return m.expand(n, 1, length, length)


_FUSABLE = [("self_attn", "qkv", ("q_proj", "k_proj", "v_proj")), ("mlp", "gate_up", ("gate_proj", "up_proj"))]


class NativeModel(nn.Module):
    """What the engine needs from a native model family (see the module docstring)."""

    family: str
    lora_targets: dict[str, str]  # short name -> module name, e.g. {"q": "q_proj"}
    embed_path: str  # the token embedding's module path, e.g. "model.embed_tokens"
    prefix_len = 0  # prefix tuning (zoft.prefix): real tokens' positions start after the P_v virtual ones
    streamer = None  # zoft.engine.offload.LayerStreamer when --offload cpu keeps the frozen weights in CPU memory
    offload_device = None  # the compute device when --offload cpu keeps blocks and vocabulary on the host

    @property
    def blocks(self) -> nn.ModuleList:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def block_prefix(self) -> str:  # e.g. "model.layers"
        raise NotImplementedError

    def embed(self, ids: torch.Tensor, pos: torch.Tensor, rows: Rows = PLAIN) -> torch.Tensor:
        raise NotImplementedError

    def position_context(self, pos: torch.Tensor):
        return None

    def norm_out(self, h: torch.Tensor, rows: Rows = PLAIN) -> torch.Tensor:
        raise NotImplementedError

    @property
    def lm_head_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def fuse_frozen(self, blocks=None) -> int:
        """Run each group of frozen layers that read the same input (q/k/v; Llama's gate/up) as one GEMM
        (Fused). Call it once the trained parameters are attached; layers trained in full are left
        alone. Returns the number of groups that run fused (those fused by an earlier call included)."""
        n = 0
        for block in self.blocks if blocks is None else blocks:
            for owner, attr, names in _FUSABLE:
                mod = getattr(block, owner, None)
                if mod is None or not hasattr(mod, attr):
                    continue
                if getattr(mod, attr) is None:
                    setattr(mod, attr, Fused.fuse([getattr(mod, x) for x in names]))
                f = getattr(mod, attr)
                n += f is not None and f.valid_for([getattr(mod, x) for x in names])
        return n

    def forward(
        self, ids: torch.Tensor, pos: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full logits for (N, L) ids; plain causal attention unless a mask is given. For tests and export."""
        if pos is None:
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        h = self.embed(ids, pos)
        ctx = self.position_context(pos)
        for layer in self.blocks:
            h = layer(h, mask, ctx)
        h = self.norm_out(h)
        w = self.lm_head_weight
        return F.linear(h.to(w.dtype), w)

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], max_new: int, stop: set[int], rows: Rows = PLAIN) -> list[list[int]]:
        """Greedy decoding with a KV cache for several prompts at once: left-padded, each row's positions
        starting at 0 and its padding masked out of every key set, so each row decodes as if alone.
        With perturbation rows, prompts are rows.P blocks of equal size, block p decoded under perturbation p."""
        st = self.streamer if self.offload_device is None else stream_blocks(self, self.offload_device)
        dev = self.lm_head_weight.device if st is None else st.device
        n, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, P, dtype=torch.long)
        real = torch.zeros(n, P, dtype=torch.bool)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):] = torch.tensor(p)
            real[r, P - len(p):] = True
        ids, real = ids.to(dev), real.to(dev)
        pos = (real.cumsum(1) - 1).clamp(min=0)
        eye = torch.eye(P, dtype=torch.bool, device=dev)
        mask = (torch.ones(P, P, dtype=torch.bool, device=dev).tril() & real[:, None, :]) | eye  # pads see themselves
        mask = mask[:, None]  # (n, 1, P, P)
        keys = real  # (n, keys so far): which cached keys are real tokens
        caches = [{} for _ in self.blocks]
        out: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        for _ in range(max_new):
            h = self.embed(ids, pos, rows)
            ctx = self.position_context(pos)
            for i, (layer, cache) in enumerate(zip(self.blocks, caches, strict=True)):
                if st is not None:  # blocks streamed from CPU memory: every decoding step sends them all
                    st.enter(i)
                    st.prefetch(i + 1)
                h = layer(h, mask, ctx, cache, rows)
                if st is not None:
                    st.exit(i)
            w = self.lm_head_weight
            hl = self.norm_out(h[:, -1:], rows).to(w.dtype)
            nxt = (rows.logits(hl, w) if st is None else head_logits(hl, w))[:, 0].argmax(-1)  # (n,)
            for r, t in enumerate(nxt.tolist()):
                if not done[r]:
                    if t in stop:
                        done[r] = True
                    else:
                        out[r].append(t)
            if all(done):
                break
            keys = torch.cat([keys, torch.ones(n, 1, dtype=torch.bool, device=dev)], 1)
            ids, pos, mask = nxt[:, None], pos[:, -1:] + 1, keys[:, None, None, :]
        return out

    def generate(self, prompt: list[int], max_new: int, stop: set[int], rows: Rows | int = PLAIN) -> list[list[int]]:
        """Greedy decoding of one prompt under each of rows.P perturbations (one output per row block; an
        int: that many unperturbed copies); stops a row at a token in `stop` (kept out of the output) or
        after max_new."""
        rows = Rows(rows) if isinstance(rows, int) else rows
        return self.generate_batch([prompt] * rows.P, max_new, stop, rows)
