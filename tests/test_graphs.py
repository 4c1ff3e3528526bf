"""CUDA graphs over the trained blocks: a replay must give what the eager forward gives, step after step.

Runs only on a GPU (the `gpu` marker); on the CPU the engine never builds graphs, which the last test checks.
"""

import pytest
import torch

from tests.tiny import make_tiny
from zoft.config import ModelConfig, ZOConfig
from zoft.session import attach, load_session, make_engine
from zoft.tasks import get_task, sample_splits
from zoft.tasks.encode import encode
from zoft.train.step import step_losses
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import sgd_update_


def trajectory(folder, mode, layers, graphs, device="cuda", steps=6):
    """Losses and final parameters of `steps` ZO steps over two batches of different sizes, alternating
    (each shape is recorded when met a second time, then replayed)."""
    s = load_session(ModelConfig(model=folder, device=device))
    attach(s, ZOConfig(mode=mode, layers=layers), seed=0)
    eng = make_engine(s, cuda_graphs=graphs)
    enc, _ = encode(s.tokenizer, sample_splits(get_task("rotten_tomatoes"), 40, 0, 0)["train"], s.max_length)
    batches = [enc[0:8], enc[8:12]]
    eps, lr = (1e-2, 1e-1) if mode == "lora" else (1e-3, 1e-3)
    out = []
    for i in range(steps):
        seeds = direction_seeds(0, i, 2)
        lp, lm, g = step_losses(eng, s, batches[i % len(batches)], "candidate", seeds, eps)
        sgd_update_(s.trainable, seeds, g, lr, 0.0)
        out.append(torch.cat([lp, lm]))
    return torch.stack(out), [t.detach().clone() for t in s.trainable.tensors], eng


@pytest.mark.gpu
@pytest.mark.parametrize("kind,mode,layers", [("opt", "lora", ""), ("llama", "lora", "top2"), ("llama", "full", "1-2")])
def test_graph_replay_matches_eager(tmp_path, kind, mode, layers):
    folder = make_tiny(kind, str(tmp_path))
    eager, te, e = trajectory(folder, mode, layers, graphs=False)
    graphed, tg, g = trajectory(folder, mode, layers, graphs=True)
    assert e.graphs is None
    assert g.graphs.captures == 2 and g.graphs.replays >= 2 and g.graphs.eager == 2, vars(g.graphs)
    assert (eager[:, 0] != eager[0, 0]).any()  # the parameters moved: later replays saw new perturbations
    torch.testing.assert_close(graphed, eager, rtol=0, atol=1e-5)
    for a, b in zip(tg, te, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_no_graphs_on_cpu(tmp_path):
    folder = make_tiny("opt", str(tmp_path))
    s = load_session(ModelConfig(model=folder, device="cpu"))
    attach(s, ZOConfig(mode="lora"), seed=0)
    assert make_engine(s, cuda_graphs=True).graphs is None


@pytest.mark.gpu
def test_triton_z_backend_is_wired_into_full_mode(tmp_path):
    """auto picks the Triton kernel on CUDA; the update moves each tensor by −lr·g·z(param_seed(seed, i))
    with the kernel's own z, and the ±ε passes of a step put the parameters back."""
    from zoft.zo.kernels.perturb_triton import randn_triton
    from zoft.zo.noise import param_seed

    folder = make_tiny("llama", str(tmp_path))
    s = load_session(ModelConfig(model=folder, device="cuda"))
    attach(s, ZOConfig(mode="full", layers="1"), seed=0)
    tr = s.trainable
    assert tr.z_backend == "triton"
    eng = make_engine(s)
    enc, _ = encode(s.tokenizer, sample_splits(get_task("rotten_tomatoes"), 8, 0, 0)["train"], s.max_length)
    before = [t.detach().clone() for t in tr.tensors]
    seeds = direction_seeds(0, 0, 2)
    lp, lm, g = step_losses(eng, s, enc, "candidate", seeds, 1e-3)
    assert lp.ne(lm).all()
    for a, b in zip(tr.tensors, before, strict=True):  # +εz, −2εz, +εz: back to within rounding
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    sgd_update_(tr, seeds, g, 1e-3, 0.0)
    for i, (a, b) in enumerate(zip(tr.tensors, before, strict=True)):
        want = b + sum(-1e-3 * gj / 2 * randn_triton(b.numel(), param_seed(sj, i), "cuda").view_as(b)
                       for sj, gj in zip(seeds, g))
        torch.testing.assert_close(a, want, rtol=0, atol=1e-6)


def test_z_backend_choice(tmp_path):
    from zoft.errors import ZoftError
    from zoft.session import resolve_z_backend

    assert resolve_z_backend("auto", "cpu") == "torch"
    assert resolve_z_backend("torch", "cuda") == "torch"
    with pytest.raises(ZoftError, match="needs a CUDA device"):
        resolve_z_backend("triton", "cpu")
