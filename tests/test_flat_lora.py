"""LoRA factors laid out in one flat tensor, and the persistent row bank: the same numbers as the
per-tensor code, with θ, the snapshot and the update one op each and no per-step views."""

import pytest
import torch

from tests.tiny import make_tiny
from zoft.config import ModelConfig, ZOConfig
from zoft.lora import bank_views
from zoft.session import attach, load_session
from zoft.zo.trainable import Trainable, direction_seeds
from zoft.zo.update import sgd_update_


def session(tmp_path, device="cpu", dtype="float32"):
    s = load_session(ModelConfig(model=make_tiny("llama", str(tmp_path)), device=device, dtype=dtype))
    attach(s, ZOConfig(mode="lora"), seed=0)
    return s


def test_flat_update_equals_per_tensor(tmp_path):
    s = session(tmp_path)
    tr = s.trainable
    assert tr.flat_buffer() is not None
    with torch.no_grad():
        for t in tr.tensors:
            t.normal_()
    copies = [t.detach().clone() for t in tr.tensors]
    plain = Trainable(tr.names, copies, tr.decay, flat=True)  # no store: the per-tensor path
    assert plain.flat_buffer() is None
    for step in range(3):
        seeds = direction_seeds(0, step, 2)
        g = torch.tensor([0.3, -1.7], dtype=torch.float64)
        sgd_update_(tr, seeds, g, 1e-2, 0.0)
        sgd_update_(plain, seeds, g, 1e-2, 0.0)
    for a, b in zip(tr.tensors, plain.tensors, strict=True):
        assert torch.equal(a, b)


def test_repointed_factor_falls_back(tmp_path):
    s = session(tmp_path)
    s.trainable.tensors[3].data = s.trainable.tensors[3].data.clone()
    assert s.trainable.flat_buffer() is None


def test_row_bank_persists_and_matches(tmp_path):
    s = session(tmp_path)
    seeds = direction_seeds(0, 0, 1)
    first = None
    for step in range(2):
        seeds = direction_seeds(0, step, 1)
        rows = s.perturber.rows(seeds, 1e-2)
        got = [(rows.views[m][0][0].clone(), rows.views[m][0][1].clone()) for m in s.loras.values()]
        ids = [id(rows.views[m][0][0]) for m in s.loras.values()]
        first = first or ids
        assert ids == first  # the same views every step: nothing made per step
        views = bank_views(s.loras.values(), rows.bank.clone())  # the one-off path, from the same bank
        for m, (a, b) in zip(s.loras.values(), got, strict=True):
            assert torch.equal(views[m][0][0], a) and torch.equal(views[m][0][1], b)
    assert not any(hasattr(m, "rows") for m in s.loras.values())  # nothing written onto the modules


@pytest.mark.gpu
def test_row_bank_half_split_on_cuda(tmp_path):
    """On a bf16 base the bank's half split (hi + lo of (α/r)·A, B in half) is bank_views's, bitwise."""
    s = session(tmp_path, "cuda", "bfloat16")
    rows = s.perturber.rows(direction_seeds(0, 0, 2), 1e-2)
    got = [tuple(t.clone() for t in rows.views[m][1]) for m in s.loras.values()]
    views = bank_views(s.loras.values(), rows.bank.clone())
    for m, want in zip(s.loras.values(), got, strict=True):
        for a, b in zip(views[m][1], want, strict=True):
            assert torch.equal(a, b)


def test_half_split_arithmetic():
    """The one split both the persistent bank and bank_views use: hi + lo carry (α/r)·bank beyond
    half precision, and the third part is the bank in half."""
    from zoft.lora import _fill_split

    torch.manual_seed(0)
    bank = torch.randn(2, 50)
    split = tuple(torch.empty(2, 50, dtype=torch.bfloat16) for _ in range(3))
    _fill_split(bank, (2.0, torch.bfloat16), split, torch.empty_like(bank))
    hi, lo, b = split
    assert torch.equal(hi, (bank * 2.0).to(torch.bfloat16))
    assert torch.equal(b, bank.to(torch.bfloat16))
    err_split = (hi.float() + lo.float() - bank * 2.0).abs().max()
    err_hi = (hi.float() - bank * 2.0).abs().max()
    assert err_split < err_hi / 100
