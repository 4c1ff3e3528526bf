"""LoRA rows on a half-precision base (CUDA): the bf16 hi + lo split of A against float32 arithmetic."""

import pytest
import torch
from torch import nn

from zoft.lora import LoRALinear, set_bank_views


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_rows_match_float32_rows(dtype):
    torch.manual_seed(0)
    base = nn.Linear(256, 384).to("cuda", dtype)
    m = LoRALinear(base, 8, 16.0)
    P, T = 4, 96
    bank = torch.randn(P, m.lora_A.numel() + m.lora_B.numel(), device="cuda") * 0.05
    x = torch.randn(P * T, 256, device="cuda").to(dtype)
    set_bank_views([m], bank)
    assert m.rows_half is not None and m.rows_half[0].dtype == dtype
    with torch.no_grad():
        fast = m(x)
        A, B = m.rows
        exact = (x.double().view(P, T, -1) @ A.double().transpose(1, 2) @ B.double().transpose(1, 2)).view(P * T, -1)
        d_fast = fast.double() - base(x).double()
    scale = exact.abs().max().item() * m.scaling
    assert scale > 1e-2  # the update is not negligible, so the comparison means something
    # the fast path's only rounding beyond float32 is y's own (half) rounding of y + Δ
    err = (d_fast - m.scaling * exact).abs().max().item()
    ulp = base(x).abs().max().item() * (2**-8 if dtype == torch.bfloat16 else 2**-11)
    assert err <= ulp, (err, ulp)
    m.rows_half = None  # the float32 path on the same rows
    with torch.no_grad():
        slow = m(x)
    assert (fast.float() - slow.float()).abs().max().item() <= ulp
    # down-projection alone: the hi + lo split is float32-grade (no y rounding involved)
    set_bank_views([m], bank)
    hi, lo = m.rows_half
    t = torch.bmm(x.view(P, T, -1), hi.transpose(1, 2), out_dtype=torch.float32) + torch.bmm(
        x.view(P, T, -1), lo.transpose(1, 2), out_dtype=torch.float32)
    t_exact = x.double().view(P, T, -1) @ A.double().transpose(1, 2)
    assert (t.double() - t_exact).abs().max().item() <= 2e-5 * t_exact.abs().max().item()
