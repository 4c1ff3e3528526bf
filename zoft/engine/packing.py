"""Packed batches: each example one segment (prompt, then its candidates), segments packed into rows.

What the layout shares, and why each is exact, is in zoft.engine.native's docstring; this module builds
the index arrays: where each segment lives, which hidden state predicts each target token, and (on a
GPU) the variable-length attention plan.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from zoft.models.common import Varlen
from zoft.tasks.encode import Encoded


@dataclass
class Segment:
    """One example laid out for packing: prompt then each candidate, with positions and branch ids."""

    ids: list[int]
    pos: list[int]
    branch: list[int]  # 0 for prompt tokens, k+1 for candidate k
    key: tuple  # cache key: the example's token ids


def make_segment(e: Encoded, cands: list[list[int]], share_prompt: bool, trim: bool = False) -> list[Segment]:
    """share_prompt=False gives one segment per candidate (the reference MeZO layout).
    trim: leave out each candidate's last token. No score reads its hidden state (token t is predicted
    from position t-1), and only later tokens of its own candidate could attend to it, so running it is
    work without effect; with one-token candidates a segment is just the prompt."""
    if trim:
        cands = [c[:-1] for c in cands]
    lp = len(e.prompt_ids)
    if not share_prompt:
        return [
            Segment(e.prompt_ids + c, list(range(lp + len(c))), [0] * lp + [1] * len(c), (tuple(e.prompt_ids), tuple(c)))
            for c in cands
        ]
    ids, pos, br = list(e.prompt_ids), list(range(lp)), [0] * lp
    for k, c in enumerate(cands):
        ids += c
        pos += range(lp, lp + len(c))
        br += [k + 1] * len(c)
    return [Segment(ids, pos, br, (tuple(e.prompt_ids),) + tuple(tuple(c) for c in cands))]


def longs_to(device, *arrays: list[int]) -> list[torch.Tensor]:
    """Integer lists as int64 tensors on `device`, through one host→device copy. On CUDA the copy is
    from pinned memory and asynchronous: a copy from pageable memory makes the host wait until the GPU
    has drained its queue, which would stall the train loop's pipeline (zoft.train.loop) once per tensor."""
    host = torch.tensor([x for a in arrays for x in a], dtype=torch.long)
    if torch.device(device).type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    return list(host.split([len(a) for a in arrays]))


@dataclass
class Packs:
    ids: torch.Tensor  # (N, L)
    pos: torch.Tensor  # (N, L)
    mask: torch.Tensor | None  # (N, 1, L, L) bool, True = may attend (None with a varlen plan)
    valid: torch.Tensor  # (N, L) bool, False on padding
    where: list[tuple[int, int]]  # segment i lives at (pack row, start)
    varlen: Varlen | None = None  # the same attention as packed causal sequences (flash varlen)

    @property
    def attn(self):
        """What the blocks' attention takes: the varlen plan when there is one, else the mask."""
        return self.varlen if self.varlen is not None else self.mask


def _up_to(n: int, m: int) -> int:
    return -(-n // m) * m


def pack(segments: list[Segment], pack_tokens: int, device, one_per_row: bool = False,
         varlen: bool = False) -> Packs:
    """First-fit packing in order; a segment longer than pack_tokens gets a row of its own.
    one_per_row: no packing, each segment right-padded in its own row (the transformers fallback).
    varlen: every segment in one row, attention by a Varlen plan instead of an L×L mask (no mask, so
    nothing bounds the row's length; padding is only the row's tail, to a multiple of 64 or 256)."""
    rows: list[list[int]] = []
    fill: list[int] = []
    where = []
    if varlen:  # one row, each segment after the one before
        starts = list(itertools.accumulate((len(s.ids) for s in segments), initial=0))
        where, rows, fill = [(0, st) for st in starts[:-1]], [list(range(len(segments)))], [starts[-1]]
    else:
        for i, s in enumerate(segments):
            n = len(s.ids)
            for r in range(0 if one_per_row else len(rows)):
                if fill[r] + n <= pack_tokens:
                    where.append((r, fill[r]))
                    rows[r].append(i)
                    fill[r] += n
                    break
            else:
                where.append((len(rows), 0))
                rows.append([i])
                fill.append(n)
    N, L = len(rows), max(fill)
    if varlen:
        L = _up_to(L, 64 if L <= 2048 else 256)  # few distinct shapes: kernels and CUDA graphs are reused
    elif torch.device(device).type == "cuda":  # few distinct shapes: kernels, plans and CUDA graphs are reused
        L = _up_to(pack_tokens if N > 1 else L, 64)  # several rows: the first is nearly full anyway
    ids, pos, br, seg = [0] * (N * L), [0] * (N * L), [0] * (N * L), [-1] * (N * L)
    for i, (s, (r, st)) in enumerate(zip(segments, where)):
        o, n = r * L + st, len(s.ids)
        ids[o : o + n], pos[o : o + n], br[o : o + n], seg[o : o + n] = s.ids, s.pos, s.branch, [i] * n
    if varlen:
        cu_q, cu_k, kidx, (max_q, max_k, identity) = _varlen_lists(segments, where, fill[0], L)
        ids, pos, cu_q, cu_k, kidx = longs_to(device, ids, pos, cu_q, cu_k, kidx)
        plan = Varlen(cu_q.int(), cu_k.int(), kidx, max_q, max_k, L, identity)
        return Packs(ids.view(1, L), pos.view(1, L), None, torch.arange(L, device=device)[None] < fill[0], where, plan)
    ids, pos, seg, br = (t.view(N, L) for t in longs_to(device, ids, pos, seg, br))  # the mask is built there
    same = seg[:, :, None] == seg[:, None, :]
    causal = pos[:, None, :] <= pos[:, :, None]
    branch_ok = (br[:, None, :] == 0) | (br[:, None, :] == br[:, :, None])
    eye = torch.eye(L, dtype=torch.bool, device=device)
    mask = (same & causal & branch_ok & (seg[:, :, None] >= 0)) | eye  # pads attend to themselves (no NaN rows)
    return Packs(ids, pos, mask[:, None], seg >= 0, where)


def _varlen_lists(segments: list[Segment], where, fill: int, L: int) -> tuple[list[int], list[int], list[int], tuple[int, int, bool]]:
    """The query sequences of one packed row (see Varlen): cu_q, cu_k, kidx, and (max_q, max_k, identity)."""
    q_len, k_len, kidx = [], [], []
    for s, (_, st) in zip(segments, where):
        lp = s.branch.count(0)  # the prompt, then each candidate's tokens in order
        runs, o = [], st + lp  # (start, length) of each candidate
        for _, toks in itertools.groupby(s.branch[lp:]):
            n = len(list(toks))
            runs.append((o, n))
            o += n
        first = runs[0][1] if runs else 0
        q_len.append(lp + first)
        k_len.append(lp + first)
        kidx += range(st, st + lp + first)
        for o, n in runs[1:]:
            q_len.append(n)
            k_len.append(lp + n)
            kidx += range(st, st + lp)
            kidx += range(o, o + n)
    if fill < L:  # the row's tail padding: one sequence attending to itself
        q_len.append(L - fill)
        k_len.append(L - fill)
        kidx += range(fill, L)
    identity = len(kidx) == L  # no further candidates: each sequence attends to itself (no gather)
    # sizes rounded so that a run meets few distinct shapes (one CUDA graph each), finely where small
    S, Tk = _up_to(len(q_len), 32), L if identity else _up_to(len(kidx), 256 if len(kidx) <= 4096 else 2048)
    cu_q, cu_k = [0], [0]
    for a, b in zip(q_len, k_len):
        cu_q.append(cu_q[-1] + a)
        cu_k.append(cu_k[-1] + b)
    cu_q += [cu_q[-1]] * (S + 1 - len(cu_q))  # zero-length sequences up to the padded count
    cu_k += [cu_k[-1]] * (S + 1 - len(cu_k))
    kidx += [0] * (Tk - len(kidx))  # keys past cu_k[-1] are never read
    bucket = lambda n: _up_to(n, 64 if n <= 256 else 256)  # noqa: E731
    return cu_q, cu_k, kidx, (bucket(max(q_len)), bucket(max(k_len)), identity)


@dataclass
class Batch:
    """A packed batch plus the index arrays that turn hidden states into per-candidate scores."""

    packs: Packs
    segments: list[Segment]
    src: torch.Tensor  # (M,) flat index into N*L: the hidden state that predicts target m
    tgt: torch.Tensor  # (M,) target token ids
    cand_len: torch.Tensor  # (C,)
    cand_tok: torch.Tensor  # (C, W) target indices of each candidate's tokens, padded with M (a zero slot)
    cand_example: torch.Tensor  # (C,) example index of each candidate
    cand_slot: torch.Tensor  # (C,) index of the candidate within its example
    answers: torch.Tensor  # (E,)
    n_slots: int  # most candidates of any example
    single_token: bool  # every candidate one token, one source position per example
    naive_tokens: int  # Σ over (example, candidate) of prompt + candidate tokens


def build_batch(
    encoded: list[Encoded],
    device,
    pack_tokens: int = 1024,
    share_prompt: bool = True,
    gold_only: bool = False,
    one_per_row: bool = False,
    varlen: bool = False,
) -> Batch:
    segments: list[Segment] = []
    owners: list[list[tuple[int, int, list[int]]]] = []  # per segment: (example, slot, cand ids)
    for ei, e in enumerate(encoded):
        cands = [(k, c) for k, c in enumerate(e.cand_ids) if not gold_only or k == e.answer]
        segs = make_segment(e, [c for _, c in cands], share_prompt, trim=share_prompt)
        segments += segs
        if share_prompt:
            owners.append([(ei, k, c) for k, c in cands])
        else:
            owners += [[(ei, k, c)] for k, c in cands]
    packs = pack(segments, max(pack_tokens, max(len(s.ids) for s in segments)), device, one_per_row, varlen)
    L = packs.ids.shape[1]
    src, tgt, cand_start, cand_len, cand_ex, cand_slot = [], [], [], [], [], []
    naive = 0
    for s, own, (r, st) in zip(segments, owners, packs.where):
        lp = s.branch.count(0)
        offset = lp  # candidates follow the prompt in segment order
        for ei, k, c in own:
            cand_start.append(len(tgt))
            naive += lp + len(c)
            for t in range(len(c)):
                prev = (lp - 1) if t == 0 else (offset + t - 1)
                src.append(r * L + st + prev)
                tgt.append(c[t])
            offset += max(len(c) - 1, 0) if share_prompt else len(c)  # shared-prompt segments are trimmed
            cand_len.append(len(c))
            cand_ex.append(ei)
            cand_slot.append(k)
    single = all(n == 1 for n in cand_len) and share_prompt
    width = max(cand_len, default=1)
    cand_tok = [st + t if t < n else len(tgt) for st, n in zip(cand_start, cand_len) for t in range(width)]
    src, tgt, cand_len_t, cand_ex, cand_slot, answers, cand_tok = longs_to(
        device, src, tgt, cand_len, cand_ex, cand_slot, [e.answer for e in encoded], cand_tok)
    return Batch(
        packs=packs,
        segments=segments,
        src=src,
        tgt=tgt,
        cand_len=cand_len_t,
        cand_example=cand_ex,
        cand_slot=cand_slot,
        answers=answers,
        cand_tok=cand_tok.view(len(cand_len), width),
        n_slots=max(len(e.cand_ids) for e in encoded),
        single_token=single,
        naive_tokens=naive,
    )


