"""Layer streaming gives the same losses and updates as a resident model (CPU path of the streamer)."""

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import make_tiny
from zoft.config import ModelConfig, ZOConfig
from zoft.engine.offload import HostEmbedding, head_logits
from zoft.session import attach, load_session, make_engine
from zoft.tasks import get_task, sample_splits
from zoft.tasks.encode import encode
from zoft.train.step import step_losses
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import sgd_update_


def run(folder, offload, mode, layers, steps=3, dtype="float32"):
    s = load_session(ModelConfig(model=folder, offload=offload, dtype=dtype))
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


@pytest.mark.parametrize("mode,layers,dtype", [("lora", "", "float32"), ("full", "1-2", "float32"),
                                               ("full", "1-2", "bfloat16")])
def test_streamed_equals_resident(tmp_path, mode, layers, dtype):
    """bfloat16 full mode: the trained blocks become float32 copies after the model is offloaded; the
    streamer must not stream their stale bf16 host copies (it is made after attach)."""
    folder = make_tiny("llama", str(tmp_path))
    l1, t1 = run(folder, "none", mode, layers, dtype=dtype)
    l2, t2 = run(folder, "cpu", mode, layers, dtype=dtype)
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


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_host_vocabulary_on_cuda(tmp_path, family):
    """The embedding and head stay in CPU memory; the LM loss (whole head, in chunks) and greedy decoding
    (every block streamed per token) match the resident model."""
    folder = make_tiny(family, str(tmp_path))
    res = {}
    for offload in ("none", "cpu"):
        s = load_session(ModelConfig(model=folder, offload=offload, device="cuda"))
        assert s.model.lm_head_weight.device.type == ("cpu" if offload == "cpu" else "cuda")
        gen = s.model.generate_batch([[5, 9, 13, 2], [7, 3]], 6, set())
        attach(s, ZOConfig(mode="lora"), seed=0)
        eng = make_engine(s, cache_mb=0)
        enc, _ = encode(s.tokenizer, sample_splits(get_task("rotten_tomatoes"), 8, 0, 0)["train"], s.max_length)
        res[offload] = gen, step_losses(eng, s, enc, "lm", direction_seeds(0, 0, 1), 1e-2)[:2]
    assert res["none"][0] == res["cpu"][0]
    for a, b in zip(res["none"][1], res["cpu"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_vocabulary_tables_stay_on_the_host(tmp_path):
    """--offload cpu keeps the token embedding (and a tied head) in CPU memory; the LM loss, which reads
    the whole head, gives the resident model's losses."""
    folder = make_tiny("opt", str(tmp_path))
    out = {}
    for offload in ("none", "cpu"):
        s = load_session(ModelConfig(model=folder, offload=offload))
        attach(s, ZOConfig(mode="lora"), seed=0)
        eng = make_engine(s, cache_mb=0)
        assert isinstance(s.model.model.decoder.embed_tokens, HostEmbedding) == (offload == "cpu")
        enc, _ = encode(s.tokenizer, sample_splits(get_task("rotten_tomatoes"), 8, 0, 0)["train"], s.max_length)
        out[offload] = step_losses(eng, s, enc, "lm", direction_seeds(0, 0, 1), 1e-2)[:2]
    for a, b in zip(out["none"], out["cpu"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_head_logits_in_chunks():
    torch.manual_seed(0)
    h, w = torch.randn(2, 5, 16), torch.randn(23, 16)
    torch.testing.assert_close(head_logits(h, w, chunk=7), F.linear(h, w))


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_generation_with_streamed_blocks(tmp_path, family):
    """Greedy decoding streams every block per token and reads the host head in chunks: same tokens."""
    folder = make_tiny(family, str(tmp_path))
    prompts = [[5, 9, 13, 2], [7, 3]]
    got = {o: load_session(ModelConfig(model=folder, offload=o)).model.generate_batch(prompts, 6, set())
           for o in ("none", "cpu")}
    assert got["none"] == got["cpu"]


def test_weights_beyond_host_memory_are_refused_before_allocating(tmp_path, monkeypatch):
    """--offload cpu (and any CPU run) keeps the weights in host memory: a model larger than what the host has
    available is one zoft: error line, before anything is allocated, not the OOM killer's silent kill."""
    import contextlib
    import io

    from zoft import loading
    from zoft.cli import main

    model = make_tiny("opt", str(tmp_path))
    monkeypatch.setattr(loading, "available_host_memory", lambda: 1024)  # the host has 1 KiB to spare
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(["train", "--model", model, "--device", "cpu", "--offload", "cpu", "--mode", "full", "--layers", "1",
              "--task", "rotten_tomatoes", "--n-train", "8", "--n-test", "4", "--n-dev", "4", "--steps", "1",
              "--output-dir", str(tmp_path / "run")])
    assert e.value.code == 2
    lines = [x for x in err.getvalue().splitlines() if x.startswith("zoft: error:")]
    assert len(lines) == 1 and "GiB of host memory" in lines[0] and "available" in lines[0], err.getvalue()
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_full_mode_streams_its_trained_blocks(tmp_path):
    """--offload cpu with --mode full: the trained blocks stay in host memory, held by the streamer (not moved
    to the device), and the update writes through to those host copies."""
    folder = make_tiny("llama", str(tmp_path))
    s = load_session(ModelConfig(model=folder, offload="cpu", dtype="bfloat16"))
    attach(s, ZOConfig(mode="full", layers="1-2"), seed=0)
    streamed = {id(p) for items in s.model.streamer.host for p, _ in items}
    assert s.trainable.streamer is s.model.streamer
    assert all(id(t) in streamed for t in s.trainable.tensors)
    before = [t.detach().clone() for t in s.trainable.tensors]
    hosts = [t.data_ptr() for t in s.trainable.tensors]
    sgd_update_(s.trainable, direction_seeds(0, 0, 1), [50.0], 1e-2, 0.0)
    assert [t.data_ptr() for t in s.trainable.tensors] == hosts  # written back into the same host tensors
    assert sum(not torch.equal(a, t) for a, t in zip(before, s.trainable.tensors)) > len(before) // 2


@pytest.mark.gpu
@pytest.mark.parametrize("master", ["auto", "float32"])
def test_streamed_full_mode_on_cuda(tmp_path, master):
    """Full mode on the GPU with its trained blocks streamed (bf16, Triton z, stochastic rounding) gives the
    losses and the updated weights of the resident run, bitwise, step after step."""
    folder = make_tiny("llama", str(tmp_path))

    def go(offload):
        s = load_session(ModelConfig(model=folder, offload=offload, device="cuda", dtype="bfloat16"))
        attach(s, ZOConfig(mode="full", layers="0-1", master_dtype=master), seed=0)
        eng = make_engine(s, cache_mb=0)
        enc, _ = encode(s.tokenizer, sample_splits(get_task("rotten_tomatoes"), 8, 0, 0)["train"], s.max_length)
        out = []
        for i in range(3):
            seeds = direction_seeds(0, i, 2)
            lp, lm, g = step_losses(eng, s, enc, "candidate", seeds, 1e-3)
            sgd_update_(s.trainable, seeds, g, 1e-3, 0.1)
            out.append((lp.tolist(), lm.tolist()))
        assert s.trainable.z_backend == "triton"
        return out, [t.detach().cpu() for t in s.trainable.tensors], s

    (l1, t1, _), (l2, t2, s2) = go("none"), go("cpu")
    assert all(t.device.type == "cpu" for t in s2.trainable.tensors)
    assert l1 == l2
    for a, b in zip(t1, t2, strict=True):
        assert torch.equal(a, b)
