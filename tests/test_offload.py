"""Layer streaming gives the same losses and updates as a resident model (CPU path of the streamer)."""

import pytest
import torch

from tests.tiny import make_tiny
from zoft.config import ModelConfig, ZOConfig
from zoft.session import attach, load_session, make_engine
from zoft.tasks import get_task, sample_splits
from zoft.tasks.encode import encode
from zoft.train import step_losses
from zoft.zo import direction_seeds, sgd_update_


def run(folder, offload, mode, layers, steps=3):
    s = load_session(ModelConfig(model=folder, offload=offload))
    attach(s, ZOConfig(mode=mode, layers=layers), seed=0)
    eng = make_engine(s, cache_mb=0)
    assert (eng.streamer is not None) == (offload == "cpu")
    enc, _ = encode(s.tokenizer, sample_splits(get_task("rotten_tomatoes"), 8, 0, 0)["train"], s.max_length)
    losses = []
    for i in range(steps):
        seeds = direction_seeds(0, i, 2)
        lp, lm, g = step_losses(eng, s, enc, "candidate", seeds, 1e-2 if mode == "lora" else 1e-3)
        sgd_update_(s.trainable, seeds, g, 1e-2 if mode == "lora" else 1e-4, 0.0)
        losses.append((lp.tolist(), lm.tolist()))
    return losses, [t.detach().clone() for t in s.trainable.tensors]


@pytest.mark.parametrize("mode,layers", [("lora", ""), ("full", "1-2")])
def test_streamed_equals_resident(tmp_path, mode, layers):
    folder = make_tiny("llama", str(tmp_path))
    l1, t1 = run(folder, "none", mode, layers)
    l2, t2 = run(folder, "cpu", mode, layers)
    assert l1 == l2
    for a, b in zip(t1, t2, strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_streamed_equals_resident_on_cuda(tmp_path):
    """On the GPU the copies run on a side stream; the results must not change."""
    folder = make_tiny("opt", str(tmp_path))

    def go(offload):
        s = load_session(ModelConfig(model=folder, offload=offload, device="cuda"))
        attach(s, ZOConfig(mode="lora"), seed=0)
        eng = make_engine(s)
        enc, _ = encode(s.tokenizer, sample_splits(get_task("rotten_tomatoes"), 8, 0, 0)["train"], s.max_length)
        lp, lm, g = step_losses(eng, s, enc, "candidate", direction_seeds(0, 0, 2), 1e-2)
        return lp, lm

    a, b = go("none"), go("cpu")
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)
