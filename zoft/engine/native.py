"""The forward engine: packed batches, shared prompts, per-row perturbations, logits only where read.

One call runs every perturbation row of a ZO step (the +ε and −ε copies, times n directions) in a
single batch. What it shares, and why each is exact (DESIGN.md):

* **weights**: the rows are stacked along dim 0, so every frozen GEMM reads its weight once; the step's
  ``Rows`` (zoft.zo.perturbers) give each row block its own perturbed adapter or weights.
* **the prompt across candidates**: an example is one packed segment ``prompt | cand_1 | … | cand_K``;
  candidate k attends to the prompt and to itself, never to another candidate, and its positions
  continue from the prompt's end, exactly as if it were encoded alone after the prompt.
* **no padding inside a pack**: segments are packed into rows of at most ``pack_tokens`` tokens with a
  block-diagonal mask; only the tail of each pack row is padding. On a GPU with half-precision blocks
  the whole batch is one row and attention runs flash's variable-length kernel over the segments'
  causal sequences (``zoft.models.common.Varlen``): no mask, no scores across examples.
* **no token nobody reads**: a candidate's last token is left out of its segment (token t is scored
  from the state at t−1, and no other token attends to it), so one-token candidates cost no token.
* **the frozen lower layers**: blocks below the first trained block see no perturbation, so they run
  once per batch on one copy (not once per row), and their outputs can be cached per example across
  steps (an LRU keyed by the example's token ids, within a memory budget).
* **the LM head**: hidden states are gathered at the positions whose next-token probability the loss
  reads; for the candidate loss with one-token candidates only those candidates' vocabulary rows are
  computed (the log-sum-exp is common to an example's candidates and cancels in the cross-entropy).

``Stats`` counts token×layer work actually computed (pack padding included) against a naive two-pass
MeZO that encodes each (example, candidate) as its own unpadded sequence: only work truly skipped counts.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zoft.engine.graphs import GraphCache
from zoft.engine.offload import head_logits, head_rows
from zoft.engine.packing import Batch, Packs, build_batch, pack
from zoft.errors import ZoftError
from zoft.models.common import PLAIN, Rows, Varlen, flash_varlen_available
from zoft.tasks.encode import Encoded


@dataclass
class Stats:
    """Token×layer work computed vs. a naive two-pass MeZO on the same batches (see module docstring)."""

    computed: int = 0
    naive: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    lm_head_rows: int = 0
    lm_head_rows_naive: int = 0

    def reuse(self) -> float:
        return 1.0 - self.computed / self.naive if self.naive else 0.0

    def summary(self) -> dict:
        hits = self.cache_hits + self.cache_misses
        return {
            "token_layers_computed": self.computed,
            "token_layers_naive": self.naive,
            "work_saved": round(self.reuse(), 4),
            "prefix_cache_hit_rate": round(self.cache_hits / hits, 4) if hits else None,
        }


class PrefixCache:
    """LRU of block-k inputs per example, keyed by the example's token ids, within a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.used = 0
        self.store: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def get(self, key: tuple) -> torch.Tensor | None:
        t = self.store.get(key)
        if t is not None:
            self.store.move_to_end(key)
        return t

    def put(self, key: tuple, t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.budget:
            return
        if key in self.store:
            return
        while self.used + size > self.budget and self.store:
            _, old = self.store.popitem(last=False)
            self.used -= old.numel() * old.element_size()
        self.store[key] = t
        self.used += size


@dataclass
class Scores:
    """Per-row outputs of one engine call."""

    token_lp: torch.Tensor  # (P, M) log p(target m) — or raw candidate logits when `logits_only`
    cand_sum: torch.Tensor  # (P, C) Σ token log-probs per candidate
    cand_mean: torch.Tensor  # (P, C) length-normalised
    table: torch.Tensor  # (P, E, n_slots) cand_mean laid out per example, -inf where absent
    logits_only: bool


class NativeEngine:
    """Runs a native model (OPT, Llama family) over a Batch for P perturbation rows at once."""

    def __init__(self, model, first_trained: int = 0, cache_mb: float = 0.0, pack_tokens: int = 1024,
                 streamer=None, cuda_graphs: bool = False, varlen: bool | None = None, fuse: bool = False):
        self.model = model
        self.streamer = streamer  # zoft.engine.offload.LayerStreamer: blocks' frozen weights live on the CPU
        self.first_trained = first_trained  # blocks below it are frozen: run once, maybe cached
        self.cache = PrefixCache(int(cache_mb * 2**20)) if cache_mb > 0 and first_trained > 0 else None
        self.pack_tokens = pack_tokens
        self.stats = Stats()
        self.n_layers = len(model.blocks)
        # the dtype a block computes in: its frozen weights' (bf16 base) or float32 (blocks trained in full)
        self.block_dtypes = [next(p.dtype for n, p in b.named_parameters() if "lora_" not in n) for b in model.blocks]
        on_gpu = self.device.type == "cuda" and streamer is None
        self.graphs = GraphCache() if cuda_graphs and on_gpu else None  # training calls only (see _run_trained)
        # attention over packed sequences by flash's variable-length kernel where it runs (CUDA, every block
        # in half precision); else the block-diagonal mask. varlen=None: choose; True on a CPU: the kernel's
        # semantics in plain torch (tests); the backprop baseline passes False (it keeps the mask path,
        # whose backward is the one tested)
        half = all(d in (torch.float16, torch.bfloat16) for d in self.block_dtypes)
        if varlen and self.device.type == "cuda" and not (half and flash_varlen_available(self.device)):
            raise ZoftError("--attention varlen on CUDA needs flash attention (compute capability >= 8.0, torch "
                            ">= 2.10) and half-precision blocks (--dtype bfloat16, LoRA); use --attention auto or mask")
        self.varlen = (flash_varlen_available(self.device) and half) if varlen is None else varlen
        # frozen layers sharing an input as one GEMM; only where no block is trained in full (make_engine)
        self.fused = model.fuse_frozen() if fuse else 0

    @property
    def device(self) -> torch.device:
        return self.streamer.device if self.streamer is not None else self.model.lm_head_weight.device

    def batch(self, encoded: list[Encoded], gold_only: bool = False) -> Batch:
        return build_batch(encoded, self.device, self.pack_tokens, share_prompt=True, gold_only=gold_only,
                           varlen=self.varlen)

    def _run_blocks(self, h: torch.Tensor, packs: Packs, lo: int, hi: int, rows: Rows = PLAIN) -> torch.Tensor:
        attn, ctx = _for_rows(packs.attn, self.model.position_context(packs.pos), rows.P)
        st = self.streamer
        for i in range(lo, hi):
            block = self.model.blocks[i]
            if st is not None:
                st.enter(i)
                if i + 1 < hi:
                    st.prefetch(i + 1)  # the next block's copy overlaps this block's compute
            h = block(h.to(self.block_dtypes[i]), attn, ctx, rows=rows)
            if st is not None:
                st.exit(i)
        self.stats.computed += rows.P * packs.ids.numel() * (hi - lo)
        return h

    def _lower(self, b: Batch) -> torch.Tensor:
        """Block-`first_trained` input for one copy of the batch, from the cache where possible."""
        k, p = self.first_trained, b.packs
        if self.cache is None:
            return self._run_blocks(self.model.embed(p.ids, p.pos), p, 0, k)
        missing = [i for i, s in enumerate(b.segments) if self.cache.get(s.key) is None]
        self.stats.cache_hits += len(b.segments) - len(missing)
        self.stats.cache_misses += len(missing)
        fresh = {}
        for i in missing:  # each alone: its value is a function of the segment, not of what it was packed
            s = b.segments[i]  # with (GEMM shapes change rounding), so a resumed run's cache equals the original's
            sub = pack([s], max(self.pack_tokens, len(s.ids)), self.device, varlen=self.varlen)
            fresh[i] = self._run_blocks(self.model.embed(sub.ids, sub.pos), sub, 0, k)[0, : len(s.ids)].clone()
            self.cache.put(s.key, fresh[i])
        N, L = p.ids.shape
        first = fresh[missing[0]] if missing else self.cache.get(b.segments[0].key)
        h = torch.zeros(N, L, first.shape[-1], dtype=first.dtype, device=first.device)
        for i, (s, (r, st)) in enumerate(zip(b.segments, p.where)):
            t = fresh.get(i)
            h[r, st : st + len(s.ids)] = t if t is not None else self.cache.get(s.key)
        return h

    def scores(self, b: Batch, rows: Rows | int = 1, logits_only: bool = False, grad: bool = False,
               graph: bool = False) -> Scores:
        """Scores of every row block: `rows` is the step's Rows (zoft.zo.perturbers), or a count of
        unperturbed copies. grad=True keeps the autograd graph (the first-order baseline); ZO never needs
        it. graph=True replays the trained blocks from a CUDA graph per shape when the engine has them
        (training steps: few shapes, many repeats; evaluation batches vary too much to pay)."""
        rows = Rows(rows) if isinstance(rows, int) else rows
        with torch.set_grad_enabled(grad):
            return self._scores(b, rows, logits_only, graph and not grad)

    def _run_trained(self, h: torch.Tensor, p: Packs, rows: Rows, graph: bool) -> torch.Tensor:
        """Blocks first_trained.. for all rows: eagerly, or by replaying this shape's CUDA graph."""
        k, n = self.first_trained, self.n_layers
        if not graph or self.graphs is None or not rows.graphable:
            return self._run_blocks(h, p, k, n, rows)
        ctx = self.model.position_context(p.pos)  # outside the graph: it may copy from the host
        ctx_t = [] if ctx is None else list(ctx)
        plan = p.varlen
        attn_t = plan.tensors() if plan is not None else [p.mask]
        carrier = rows.graph_tensor()  # the step's perturbation (LoRA bank, full mode's seeds), refilled per replay
        tensors = [h, *attn_t, *ctx_t] + ([carrier] if carrier is not None else [])
        blocks, dtypes = self.model.blocks, self.block_dtypes
        extra = (type(rows).__name__, plan.max_q, plan.max_k, plan.tokens, plan.identity) if plan is not None else (
            type(rows).__name__,)  # baked in

        def stack(h, *rest):  # eager on a shape's first meeting; then recorded over static buffers
            a, rest = rest[: len(attn_t)], rest[len(attn_t) :]
            attn = plan.with_tensors(*a) if plan is not None else a[0]
            attn, c = _for_rows(attn, tuple(rest[: len(ctx_t)]) if ctx is not None else None, rows.P)
            r = rows.over(rest[-1]) if carrier is not None else rows
            for i in range(k, n):
                h = blocks[i](h.to(dtypes[i]), attn, c, rows=r)
            return h

        out = self.graphs(stack, tensors, extra)
        self.stats.computed += rows.P * p.ids.numel() * (n - k)
        return out

    def _scores(self, b: Batch, rows: Rows, logits_only: bool, graph: bool = False) -> Scores:
        """Run all rows.P perturbation copies; logits_only: raw candidate logits (exact for the CE loss)."""
        m, p, P = self.model, b.packs, rows.P
        self.stats.naive += P * b.naive_tokens * self.n_layers  # naive: one pass per row, one seq per candidate
        k = self.first_trained
        if rows.perturbs_embeddings:  # each row block looks up its own perturbed tables
            h = m.embed(p.ids.repeat(P, 1), p.pos.repeat(P, 1), rows)
        else:
            h = self._lower(b) if k > 0 else m.embed(p.ids, p.pos)
            if P > 1:
                h = h.repeat(P, 1, 1)  # (P*N, L, D), row block r = perturbation r
        h = self._run_trained(h, p, rows, graph)
        N, L = p.ids.shape
        hs = h.view(P, N * L, -1)[:, b.src]  # (P, M, D): only where the loss reads
        w = m.lm_head_weight  # in CPU memory under --offload cpu: only the rows read cross the bus
        host = self.streamer is not None
        hs = m.norm_out(hs.to(w.dtype), rows)  # a float32 (fully trained) top block may feed a bf16 head
        if logits_only:
            assert b.single_token
            wt = head_rows(w, b.tgt, self.device) if host else rows.head_rows(w, b.tgt)
            token_lp = (_up(hs) * _up(wt)).sum(-1)  # (P, M): one vocab row per target
        else:
            logits = _up(head_logits(hs.to(w.dtype), w) if host else rows.logits(hs, w))  # (P, M, V)
            token_lp = logits.log_softmax(-1).gather(-1, b.tgt.expand(P, -1)[..., None])[..., 0]
        return score_table(b, token_lp, logits_only)


def _for_rows(attn, ctx, rows: int):
    """Attention (mask or varlen plan) and position context for `rows` perturbation copies stacked along
    dim 0: built once per forward, not repeated inside every block."""
    if rows > 1:
        attn = attn.repeat(rows) if isinstance(attn, Varlen) else attn.repeat(rows, 1, 1, 1)
        ctx = None if ctx is None else tuple(c.repeat(rows, *[1] * (c.dim() - 1)) for c in ctx)
    return attn, ctx


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64: the estimator tests run in it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def score_table(b: Batch, token_lp: torch.Tensor, logits_only: bool) -> Scores:
    rows = token_lp.shape[0]
    padded = F.pad(token_lp, (0, 1))  # a zero at index M for the padding of b.cand_tok
    cand_sum = padded[:, b.cand_tok].sum(-1)  # (P, C): a gather and a sum, deterministic on CUDA, where
    # index_add_'s atomics summed a candidate's tokens in a varying order. (Scores still depend on the batch
    # at rounding level, as in any engine: packing changes the GEMM shapes of the forward itself.)
    cand_mean = cand_sum / b.cand_len
    E = b.answers.numel()
    table = torch.full((rows, E, b.n_slots), float("-inf"), dtype=token_lp.dtype, device=token_lp.device)
    table[:, b.cand_example, b.cand_slot] = cand_mean
    return Scores(token_lp, cand_sum, cand_mean, table, logits_only)
