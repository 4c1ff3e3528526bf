"""LoRA rows on a half-precision base (CUDA): the half GEMMs of LoRALinear._rows_half against float32 ones."""

import pytest
import torch
from torch import nn

from zoft.lora import LoRALinear, bank_views


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_rows_match_float32_rows(dtype):
    torch.manual_seed(0)
    base = nn.Linear(256, 384).to("cuda", dtype)
    m = LoRALinear(base, 8, 16.0)
    P, T = 4, 96
    bank = torch.randn(P, m.lora_A.numel() + m.lora_B.numel(), device="cuda") * 0.02
    x = torch.randn(P * T, 256, device="cuda").to(dtype)
    (A, B), half = bank_views([m], bank)[m]
    assert half is not None and half[0].dtype == dtype
    with torch.no_grad():
        y = base(x).double()
        exact = y + m.scaling * (x.double().view(P, T, -1) @ A.double().transpose(1, 2)
                                 @ B.double().transpose(1, 2)).view(P * T, -1)
        fast = m.add_update(x, base(x), ((A, B), half)).double()
        hi, lo, _ = half
        slow = m.add_update(x, base(x), ((A, B), None)).double()  # the float32 path on the same rows
    upd = (exact - y).abs().max().item()
    assert upd > 0.05 * y.abs().max().item()  # an update that matters against y, so this compares something
    err_fast, err_slow = (fast - exact).abs().max().item(), (slow - exact).abs().max().item()
    assert 0 < err_slow and err_fast <= 2 * err_slow, (err_fast, err_slow)  # no worse than float32 + y's rounding
    # the down-projection alone: (α/r)·x·Aᵀ from the hi + lo split is float32-grade (no half rounding of y)
    t = torch.bmm(x.view(P, T, -1), hi.transpose(1, 2), out_dtype=torch.float32) + torch.bmm(
        x.view(P, T, -1), lo.transpose(1, 2), out_dtype=torch.float32)
    t_exact = m.scaling * (x.double().view(P, T, -1) @ A.double().transpose(1, 2))
    assert (t.double() - t_exact).abs().max().item() <= 2e-5 * t_exact.abs().max().item()


@pytest.mark.gpu
def test_half_rows_score_like_float32_rows(tmp_path, monkeypatch):
    """End to end on a bf16 base: the ±ε rows' candidate scores with the half rows equal the float32
    rows' once B is large enough that the update moves them (an error in its scale would show)."""
    from tests.tiny import make_tiny
    from zoft import lora
    from zoft.config import ModelConfig, ZOConfig
    from zoft.session import attach, load_session, make_engine
    from zoft.tasks import get_task, sample_splits
    from zoft.tasks.encode import encode

    folder = make_tiny("opt", str(tmp_path))
    s = load_session(ModelConfig(model=folder, device="cuda", dtype="bfloat16"))
    attach(s, ZOConfig(mode="lora"), seed=0)
    with torch.no_grad():
        for m in s.loras.values():
            m.lora_B.normal_(0, 1.0, generator=torch.Generator("cuda").manual_seed(1))
    eng = make_engine(s, cuda_graphs=False)
    enc, _ = encode(s.tokenizer, sample_splits(get_task("rotten_tomatoes"), 16, 0, 0)["train"], s.max_length)
    b = eng.batch(enc[:8])

    def losses(half: bool, seeds=(5,)):
        monkeypatch.setattr(lora, "_BMM_OUT_DTYPE", [] if half else [False])
        s.perturber.banks.clear()  # the bank's half plan is decided when it is made
        rows = s.perturber.rows(list(seeds), 1e-2)
        assert (next(iter(rows.views.values()))[1] is not None) == half
        return eng.scores(b, rows).cand_sum.float().cpu()  # what the losses are made of

    fast, slow = losses(True), losses(False)
    with torch.no_grad():
        for m in s.loras.values():
            m.lora_B.zero_()
    without = losses(False)
    moved = (slow - without).abs().max().item()
    assert moved > 0.05  # the update matters: an error in its scale would show against the tolerance below
    torch.testing.assert_close(fast, slow, rtol=0, atol=0.1 * moved)
