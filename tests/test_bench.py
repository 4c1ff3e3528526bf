"""`zoft bench`: its JSON line on a tiny model, and its MeZO reference against zoft on the same weights."""

import json
import statistics

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from tests.tiny import VOCAB, make_tiny
from zoft.bench.harness import (
    LOW_ID,
    WORKLOADS,
    Workload,
    make_batch,
    preset_config,
    run_bench,
    write_stub_tokenizer,
)
from zoft.bench.reference import inject_mezo_lora, mezo_collate, mezo_loss, mezo_params, mezo_step
from zoft.cli import main
from zoft.config import ModelConfig, ZOConfig
from zoft.loading import native_class
from zoft.models import llama, opt
from zoft.session import attach, load_session, make_engine
from zoft.train.losses import row_losses
from zoft.train.step import step_losses
from zoft.zo.trainable import direction_seeds, directions

SMALL = Workload(prompt_len=(5, 20, 8), cand_len=(1, 3), n_cands=3, fixed_cands=False)  # ragged: padding matters
KEYS = ["reference_step_ms", "forward_ms", "zoft_step_ms", "reference_peak_mb", "zoft_peak_mb",
        "speedup_vs_reference", "zoft_step_over_forward", "model", "workload", "mode", "dtype", "device",
        "work_saved"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_bench_prints_a_table_then_one_json_line(root, mode, capsys):
    folder = make_tiny("opt", root)
    main(["bench", "--model", folder, "--workload", "sst2", "--mode", mode, "--device", "cpu",
          "--steps", "2", "--warmup", "1", "--batch-size", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "MeZO reference step" in "\n".join(lines[:-1])
    r = json.loads(lines[-1])
    assert all(k in r for k in KEYS), [k for k in KEYS if k not in r]
    for k in ("reference_step_ms", "forward_ms", "zoft_step_ms", "speedup_vs_reference", "zoft_step_over_forward"):
        assert r[k] > 0, k
    assert r["reference_peak_mb"] is None and r["zoft_peak_mb"] is None  # not measured on CPU
    assert (r["model"], r["workload"], r["mode"], r["device"]) == (folder, "sst2", mode, "cpu")
    assert r["reference_trainable"] == r["zoft_trainable"] > 0  # both sides train the same parameters
    assert 0 < r["work_saved"] < 1
    assert r["zoft_tokens"] == r["useful_tokens"] < r["reference_tokens"]  # no padding, prompts once


def same_model_both_sides(root: str, mode: str):
    """The transformers model (with MeZO's LoRA in lora mode) and a zoft session, equal weights."""
    folder = make_tiny("opt", root)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    s = load_session(ModelConfig(model=folder, device="cpu", dtype="float32"))
    zc = ZOConfig(mode=mode)
    attach(s, zc)
    if mode == "lora":
        inject_mezo_lora(hf, zc.lora_r, zc.lora_alpha)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for path, m in s.loras.items():
                m.lora_B.normal_(0, 0.05, generator=g)  # B = 0 would hide A's perturbation
                ref = hf.get_submodule(path)
                ref.lora_A.copy_(m.lora_A)
                ref.lora_B.copy_(m.lora_B)
    return hf, s, make_engine(s), zc


def test_reference_loss_at_theta_equals_zoft(root):
    hf, s, engine, _ = same_model_both_sides(root, "lora")
    batch = make_batch(SMALL, 5, VOCAB, hf.config.bos_token_id, seed=1)
    with torch.inference_mode():
        want = mezo_loss(hf, mezo_collate(batch, hf.config.pad_token_id, "cpu"), hf.config.pad_token_id).item()
    b = engine.batch(batch)
    got = row_losses(engine.scores(b, 1), b, "candidate")[0].item()
    assert abs(want - got) < 1e-5, (want, got)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_reference_and_zoft_losses_match_for_the_same_z(root, mode):
    """MeZO's step (in-place ±εz on the transformers model, padded per-candidate sequences) and zoft's step
    (LoRA rows / in-place on the native model, packed shared prompts) give the same L₊ and L₋ when the
    reference draws zoft's z instead of the global generator's."""
    hf, s, engine, zc = same_model_both_sides(root, mode)
    params = mezo_params(hf)
    assert sorted(n for n, _ in params) == sorted(s.trainable.names)
    index = {n: i for i, n in enumerate(s.trainable.names)}
    seed, eps, pad = direction_seeds(0, 0, 1)[0], zc.eps_value, hf.config.pad_token_id
    zs = directions(s.trainable, seed)  # zoft's z for every trained tensor (one draw for LoRA, per tensor for full)
    z_fn = lambda name, p: zs[index[name]].to(p.device).view_as(p)
    batch = make_batch(SMALL, 4, VOCAB, hf.config.bos_token_id, seed=2)
    before = [p.detach().clone() for _, p in params]
    l1, l2, _ = mezo_step(hf, params, mezo_collate(batch, pad, "cpu"), seed, eps, 0.0, 0.0, pad, z_fn)
    lp, lm, _ = step_losses(engine, s, batch, "candidate", [seed], eps)
    assert abs(l1 - lp[0].item()) < 1e-4 and abs(l2 - lm[0].item()) < 1e-4, (l1, l2, lp, lm)
    assert abs(l1 - l2) > 1e-5  # the perturbation moved the loss: the comparison is not vacuous
    for (_, p), p0 in zip(params, before):  # +ε, −2ε, +ε restored θ (lr = 0)
        torch.testing.assert_close(p, p0, rtol=0, atol=1e-6)


def test_mezo_step_with_global_generator_restores_and_updates(root):
    """The faithful path: manual_seed(seed) regenerates the same z for restore and update."""
    hf, _, _, zc = same_model_both_sides(root, "lora")
    params = mezo_params(hf)
    pad, seed, lr = hf.config.pad_token_id, 1234, 1e-3
    inputs = mezo_collate(make_batch(SMALL, 4, VOCAB, hf.config.bos_token_id, seed=3), pad, "cpu")
    before = [p.detach().clone() for _, p in params]
    _, _, g = mezo_step(hf, params, inputs, seed, zc.eps_value, lr, 0.0, pad)
    torch.manual_seed(seed)
    for (_, p), p0 in zip(params, before):
        z = torch.normal(mean=0, std=1, size=p.size(), dtype=p.dtype)
        torch.testing.assert_close(p, p0 - lr * g * z, rtol=0, atol=1e-6)


def test_workloads_have_the_stated_lengths():
    sst2 = [e for i in range(40) for e in make_batch(WORKLOADS["sst2"], 16, VOCAB, 2, seed=i)]
    lens = [len(e.prompt_ids) for e in sst2]
    assert min(lens) >= 10 and max(lens) <= 60 and 27 < statistics.mean(lens) < 33
    assert len({tuple(e.prompt_ids[-2:]) for e in sst2}) == 1  # the " It was" template
    assert len({tuple(map(tuple, e.cand_ids)) for e in sst2}) == 1 and all(len(c) == 1 for c in sst2[0].cand_ids)
    multirc = make_batch(WORKLOADS["multirc"], 64, VOCAB, 2, seed=0)
    assert all(350 <= len(e.prompt_ids) <= 450 and len(e.cand_ids) == 2 for e in multirc)
    assert all(1 <= len(c) <= 3 for e in multirc for c in e.cand_ids)
    assert min(t for e in multirc for t in e.prompt_ids[1:] + sum(e.cand_ids, [])) >= LOW_ID  # never the pad id
    assert make_batch(WORKLOADS["multirc"], 4, VOCAB, 2, seed=5) == make_batch(WORKLOADS["multirc"], 4, VOCAB, 2, seed=5)


@pytest.mark.parametrize("name", ["opt-125m", "opt-1.3b", "opt-350m", "smollm2-135m"])
def test_preset_configs_give_the_preset_shapes(name):
    cfg = preset_config(name).to_dict()
    args = native_class(cfg)[1](cfg)
    shape = opt.PRESETS.get(name) or llama.PRESETS[name]
    for k, v in shape.items():
        assert getattr(args, k) == v, (k, getattr(args, k), v)


@pytest.mark.gpu
def test_bench_on_cuda_reports_peak_memory(tmp_path):
    """The CUDA path end to end on a small OPT (no tokenizer package needed: the stub one)."""
    cfg = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=512)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    write_stub_tokenizer(str(tmp_path))
    for mode in ("lora", "full"):
        r = run_bench(str(tmp_path), "multirc", mode, "bfloat16", "cuda", steps=2, warmup=1, batch_size=4)
        assert r["device_name"] != "cpu"
        assert r["reference_peak_mb"] > 0 and r["forward_peak_mb"] > 0 and r["zoft_peak_mb"] > 0
        assert r["reference_step_ms"] > 0 and r["zoft_step_ms"] > 0
