"""Several trainers in one process: no shared global state (generators, caches, LoRA rows) between them."""

import torch

from tests.tiny import make_tiny
from zoft.config import ModelConfig, ZOConfig
from zoft.session import attach, load_session, make_engine
from zoft.tasks import get_task, sample_splits
from zoft.tasks.encode import encode
from zoft.train.data import batch_indices
from zoft.train.step import step_losses
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import sgd_update_


def trainer(folder, seed, layers):
    s = load_session(ModelConfig(model=folder))
    attach(s, ZOConfig(mode="lora", layers=layers), seed)
    eng = make_engine(s, cache_mb=64)
    exs = sample_splits(get_task("rotten_tomatoes"), 24, 0, 0, seed=seed)["train"]
    enc, _ = encode(s.tokenizer, exs, s.max_length)
    return s, eng, enc, seed


def step(t, i):
    s, eng, enc, seed = t
    batch = [enc[j] for j in batch_indices(i, 8, len(enc), seed)]
    seeds = direction_seeds(seed, i, 2)
    _, _, g = step_losses(eng, s, batch, "candidate", seeds, 1e-2)
    sgd_update_(s.trainable, seeds, g, 1e-2, 0.0)


def test_interleaved_trainers_equal_separate_ones(tmp_path):
    a_dir, b_dir = make_tiny("opt", str(tmp_path)), make_tiny("llama", str(tmp_path))
    a1, b1 = trainer(a_dir, 1, "top2"), trainer(b_dir, 2, "")
    for i in range(4):  # interleaved in one process
        step(a1, i)
        torch.manual_seed(1234 + i)  # someone else using the global RNG must not matter
        step(b1, i)
    a2 = trainer(a_dir, 1, "top2")
    for i in range(4):
        step(a2, i)
    b2 = trainer(b_dir, 2, "")
    for i in range(4):
        step(b2, i)
    for x, y in ((a1, a2), (b1, b2)):
        for t1, t2 in zip(x[0].trainable.tensors, y[0].trainable.tensors, strict=True):
            assert torch.equal(t1, t2)
    assert any(not torch.equal(t, torch.zeros_like(t)) for t in a1[0].trainable.tensors[1::2])  # B moved
