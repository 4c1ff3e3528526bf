"""Frozen layers that share an input run as one GEMM (q/k/v, Llama's gate/up) and OPT's ReLU runs in
fc1's GEMM epilogue: the same numbers as the layers one by one, and never for layers trained in full."""

import pytest
import torch
import torch.nn.functional as F

from tests.tiny import make_tiny
from zoft.config import ModelConfig, ZOConfig
from zoft.lora import LoraArgs, LoRALinear, inject_lora, merge_lora
from zoft.models.common import linear_relu
from zoft.session import attach, load_session, make_engine
from zoft.tasks import get_task, sample_splits
from zoft.tasks.encode import encode
from zoft.train.step import step_losses
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import sgd_update_


def steps(folder, fuse, device="cpu", dtype="float32", n=3):
    s = load_session(ModelConfig(model=folder, device=device, dtype=dtype))
    attach(s, ZOConfig(mode="lora"), seed=0)
    eng = make_engine(s, cache_mb=0, fuse=fuse)
    enc, _ = encode(s.tokenizer, sample_splits(get_task("rotten_tomatoes"), 8, 0, 0)["train"], s.max_length)
    out = []
    for i in range(n):  # B moves off zero after the first update, so later steps exercise the LoRA term
        seeds = direction_seeds(0, i, 2)
        lp, lm, g = step_losses(eng, s, enc, "candidate", seeds, 1e-2)
        sgd_update_(s.trainable, seeds, g, 5e-2, 0.0)
        out.append(torch.cat([lp, lm]).double().cpu())
    return eng, torch.stack(out)


@pytest.mark.parametrize("family,groups", [("opt", 1), ("llama", 2)])
def test_fused_steps_equal_unfused(tmp_path, family, groups):
    folder = make_tiny(family, str(tmp_path))
    eng, fused = steps(folder, True)
    assert eng.fused == groups * eng.n_layers
    _, plain = steps(folder, False)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_fused_weights_are_views(tmp_path):
    """Nothing is stored twice, and a weight written in place (merging an adapter) reaches the GEMM."""
    s = load_session(ModelConfig(model=make_tiny("llama", str(tmp_path))))
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    before = s.model(ids)
    assert s.model.fuse_frozen() == 2 * len(s.model.blocks)
    assert s.model.fuse_frozen() == 2 * len(s.model.blocks)  # a second engine reports the same groups
    attn = s.model.blocks[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv.weight.data_ptr()
    torch.testing.assert_close(s.model(ids), before, rtol=1e-5, atol=1e-5)
    loras = inject_lora(s.model, s.model.block_prefix, ["q_proj", "v_proj"], None, LoraArgs())
    for m in loras.values():
        torch.nn.init.normal_(m.lora_B, std=0.05)
    with_lora = s.model(ids)  # the LoRA wrappers over the fused bases add their update to their slice
    assert not torch.allclose(with_lora, before, atol=1e-3)
    merge_lora(s.model)  # W + BA written into the base weights in place: the fused copy sees it
    assert attn.qkv.valid_for([attn.q_proj, attn.k_proj, attn.v_proj])
    torch.testing.assert_close(s.model(ids), with_lora, rtol=1e-4, atol=1e-4)


def test_repointed_weights_fall_back(tmp_path):
    """A weight re-pointed after fusing (.double(), streaming) makes the block run its layers one by one."""
    s = load_session(ModelConfig(model=make_tiny("opt", str(tmp_path))))
    s.model.fuse_frozen()
    attn = s.model.blocks[0].self_attn
    s.model.double()
    assert not attn.qkv.valid_for([attn.q_proj, attn.k_proj, attn.v_proj])
    s.model(torch.tensor([[5, 9, 13]]))  # runs, in float64, through the separate layers


def test_full_mode_is_never_fused(tmp_path):
    s = load_session(ModelConfig(model=make_tiny("opt", str(tmp_path))))
    attach(s, ZOConfig(mode="full", layers="1"), seed=0)
    # make_engine's default leaves full mode alone on any device; the rule itself:
    assert make_engine(s, cache_mb=0).fused == 0
    assert not isinstance(s.model.blocks[1].self_attn.q_proj, LoRALinear)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_fused_on_cuda(tmp_path, family):
    """bf16 base, fp32 LoRA, flash varlen, CUDA graphs: fused (the default on CUDA) against unfused."""
    folder = make_tiny(family, str(tmp_path))
    eng, fused = steps(folder, None, "cuda", "bfloat16")
    assert eng.fused > 0
    _, plain = steps(folder, False, "cuda", "bfloat16")
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_full_mode_not_fused_on_cuda(tmp_path):
    s = load_session(ModelConfig(model=make_tiny("opt", str(tmp_path)), device="cuda", dtype="bfloat16"))
    attach(s, ZOConfig(mode="full", layers="1"), seed=0)
    assert make_engine(s, cache_mb=0).fused == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_relu_epilogue(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 256).to("cuda", dtype)
    x = torch.randn(3, 37, 64, device="cuda", dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(linear_relu(lin, x), F.relu(lin(x)), rtol=1e-2, atol=1e-2)


def _full_rows_vs_inplace(device, dtype, fuse):
    from tests.test_zo import examples
    from zoft.engine.native import NativeEngine
    from zoft.loading import build_native, read_config
    from zoft.train.losses import row_losses
    from zoft.zo.perturbers import FullRowsPerturber, InPlacePerturber, estimate
    from zoft.zo.trainable import full_trainable

    def go(root):
        folder = make_tiny("opt", root)
        model = build_native(folder, read_config(folder), dtype, device).eval().requires_grad_(False)  # as loaded
        tr = full_trainable(model, [f"{model.block_prefix}.1"])
        engine = NativeEngine(model, first_trained=1, fuse=fuse)
        b = engine.batch(examples(1))
        row_fn = lambda rows: row_losses(engine.scores(b, rows), b, "candidate")
        rows = estimate(row_fn, FullRowsPerturber(model, tr), [99, 123], 1e-3)
        inplace = estimate(row_fn, InPlacePerturber(tr), [99, 123], 1e-3)
        return engine, rows, inplace

    return go


def test_fused_full_rows_runs_the_patched_layers(tmp_path):
    """Even where frozen-looking layers of a trained block were fused, the rows' per-row weights are used
    (FullRows.fusable refuses the fused GEMM for them): rows equal the in-place passes."""
    engine, (lp, lm, _), (lp2, lm2, _) = _full_rows_vs_inplace("cpu", torch.float64, True)(str(tmp_path))
    assert engine.fused > 0
    torch.testing.assert_close(lp, lp2, rtol=0, atol=1e-12)
    torch.testing.assert_close(lm, lm2, rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("fuse", [False, True])
def test_full_rows_on_cuda(tmp_path, fuse):
    """On CUDA, OPT's fc1 would take the ReLU epilogue; with full rows it must run per row block."""
    _, (lp, lm, _), (lp2, lm2, _) = _full_rows_vs_inplace("cuda", torch.float32, fuse)(str(tmp_path))
    cpu = lambda t: torch.as_tensor(t).double().cpu()
    torch.testing.assert_close(cpu(lp), cpu(lp2), rtol=0, atol=1e-5)
    torch.testing.assert_close(cpu(lm), cpu(lm2), rtol=0, atol=1e-5)
