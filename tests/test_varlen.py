"""Attention over packed sequences (flash's variable-length kernel): the plan says exactly what the mask says.

On the CPU the plan runs through `_varlen_reference` (the kernel's semantics in plain torch); the GPU test
runs the flash kernel itself, eagerly and replayed from CUDA graphs, against the mask path.
"""

import random

import pytest
import torch

from tests.tiny import make_tiny
from zoft.config import ModelConfig, ZOConfig
from zoft.engine.packing import make_segment, pack
from zoft.session import attach, load_session, make_engine
from zoft.tasks.encode import Encoded
from zoft.train.step import step_losses
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import sgd_update_


def random_examples(n, seed, max_prompt=20, vocab=100):
    rng = random.Random(seed)
    return [Encoded([rng.randrange(3, vocab) for _ in range(rng.randint(1, max_prompt))],
                    [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 3))],
                    0, "mc") for _ in range(n)]


def allowed_by_plan(plan, T):
    """(T, T) bool: query token i may attend to key token j, as the plan's sequences say."""
    out = torch.zeros(T, T, dtype=torch.bool)
    cu_q, cu_k, kidx = plan.cu_q.tolist(), plan.cu_k.tolist(), plan.kidx.tolist()
    for s in range(len(cu_q) - 1):
        q, k = list(range(cu_q[s], cu_q[s + 1])), kidx[cu_k[s] : cu_k[s + 1]]
        for i, t in enumerate(q):
            for j in k[: len(k) - len(q) + i + 1]:  # causal, aligned at the end
                out[t, j] = True
    return out


@pytest.mark.parametrize("seed", range(6))
def test_plan_allows_exactly_what_the_mask_allows(seed):
    share, trim = seed % 3 != 2, seed % 3 == 1  # trimmed: one-token candidates leave no token at all
    segs = [s for e in random_examples(9, seed) for s in make_segment(e, e.cand_ids, share, trim)]
    mask_packs = pack(segs, 10_000, "cpu")  # one row, block-diagonal mask
    plan_packs = pack(segs, 10_000, "cpu", varlen=True)
    T = sum(len(s.ids) for s in segs)
    assert mask_packs.where == plan_packs.where
    want = mask_packs.mask[0, 0, :T, :T]
    got = allowed_by_plan(plan_packs.varlen, plan_packs.ids.shape[1])
    assert torch.equal(got[:T, :T], want)
    assert not got[:T, T:].any()  # no real token sees padding
    L = plan_packs.ids.shape[1]
    assert L % 64 == 0 and L - T < 64
    assert plan_packs.varlen.cu_q[-1] == L  # every token is some sequence's query
    plan = plan_packs.varlen
    assert len(plan.cu_q) % 32 == 1  # padded for graphs
    assert plan.identity == (not share) or plan.kidx.numel() % 256 == 0
    assert not plan.identity or torch.equal(plan.kidx, torch.arange(L))


def test_plan_for_stacked_rows_offsets_each_copy():
    segs = [s for e in random_examples(5, 1) for s in make_segment(e, e.cand_ids, True)]
    plan = pack(segs, 10_000, "cpu", varlen=True).varlen
    r = plan.repeat(3)
    S, Tk, T = len(plan.cu_q) - 1, plan.kidx.numel(), plan.tokens
    assert r.tokens == 3 * T and r.kidx.numel() == 3 * Tk
    for p in range(3):
        assert torch.equal(r.kidx[p * Tk : (p + 1) * Tk], plan.kidx + p * T)
        assert torch.equal(r.cu_q[p * S : (p + 1) * S], plan.cu_q[:-1] + p * T)
        assert torch.equal(r.cu_k[p * S : (p + 1) * S], plan.cu_k[:-1] + p * Tk)
    assert r.cu_k[-1] == plan.cu_k[-1] + 2 * Tk


def run_steps(folder, kind, varlen, graphs, device, steps=4):
    s = load_session(ModelConfig(model=folder, device=device, dtype="bfloat16" if device == "cuda" else "float32"))
    attach(s, ZOConfig(mode="lora"), seed=0)
    eng = make_engine(s, cuda_graphs=graphs, varlen=varlen)
    assert eng.varlen == varlen
    vocab = s.model.lm_head_weight.shape[0]
    batches = [random_examples(6, 10 + i, max_prompt=40, vocab=vocab) for i in range(2)]
    out = []
    for i in range(steps):
        seeds = direction_seeds(0, i, 2)
        lp, lm, g = step_losses(eng, s, batches[i % 2], "candidate", seeds, 1e-2)
        sgd_update_(s.trainable, seeds, g, 1e-1, 0.0)
        out.append(torch.cat([lp, lm]).float().cpu())
    return torch.stack(out), eng


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_varlen_steps_equal_mask_steps_on_cpu(tmp_path, kind):
    folder = make_tiny(kind, str(tmp_path))
    a, _ = run_steps(folder, kind, False, False, "cpu")
    b, _ = run_steps(folder, kind, True, False, "cpu")
    assert (a[:, 0] != a[0, 0]).any()
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_flash_varlen_equals_the_mask_path_on_cuda(tmp_path, kind):
    """bf16 base: the flash kernel (eager, then replayed from graphs) against the mask path's losses."""
    folder = make_tiny(kind, str(tmp_path))
    a, _ = run_steps(folder, kind, False, False, "cuda", steps=6)
    b, eb = run_steps(folder, kind, True, False, "cuda", steps=6)
    c, ec = run_steps(folder, kind, True, True, "cuda", steps=6)
    assert ec.graphs.replays >= 2
    torch.testing.assert_close(b, a, rtol=0, atol=2e-2)  # bf16: two kernels, two summation orders
    torch.testing.assert_close(c, b, rtol=0, atol=1e-5)


def test_varlen_with_frozen_prefix_cache_equals_mask_without(tmp_path):
    """The frozen lower blocks run (and are cached per example) as varlen sequences too."""
    folder = make_tiny("llama", str(tmp_path))
    s = load_session(ModelConfig(model=folder))
    attach(s, ZOConfig(mode="lora", layers="top2"), seed=0)
    plain, cached = make_engine(s, varlen=False), make_engine(s, cache_mb=64, varlen=True)
    vocab = s.model.lm_head_weight.shape[0]
    exs = random_examples(6, 3, max_prompt=30, vocab=vocab)
    want = plain.scores(plain.batch(exs), 2).cand_sum
    for _ in range(2):  # misses, then hits
        b = cached.batch(exs[::-1][:4] + exs)  # another packing order than the plain engine's
        got = cached.scores(b, 2).cand_sum[:, -want.shape[1]:]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert cached.stats.cache_hits > 0
