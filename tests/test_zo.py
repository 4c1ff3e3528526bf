"""The estimator against autograd, batched rows against separate passes, and z's bookkeeping."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.tiny import make_tiny
from zoft.config import ModelConfig, ZOConfig
from zoft.engine.native import NativeEngine
from zoft.loading import build_native, read_config
from zoft.lora import LoraArgs, inject_lora
from zoft.session import attach, load_session
from zoft.tasks.encode import Encoded
from zoft.train.losses import row_losses
from zoft.zo.noise import add_noise_, noise
from zoft.zo.perturbers import FullRowsPerturber, InPlacePerturber, LoRAPerturber, estimate
from zoft.zo.trainable import directions, full_trainable, lora_trainable, perturb_
from zoft.zo.update import sgd_update_


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny"))


def examples(seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda n: torch.randint(3, 50000, (n,), generator=g).tolist()
    return [Encoded(rnd(6), [rnd(1), rnd(2)], 1, "mc"), Encoded(rnd(4), [rnd(3), rnd(1)], 0, "mc"),
            Encoded(rnd(8), [rnd(1), rnd(1)], 1, "mc")]


def reference_loss(model, exs):
    """MeZO's candidate loss, computed the plain way: one causal sequence per (example, candidate)."""
    losses = []
    for e in exs:
        scores = []
        for c in e.cand_ids:
            lp = model(torch.tensor([e.prompt_ids + c]))[0].log_softmax(-1)
            n = len(e.prompt_ids)
            scores.append(torch.stack([lp[n - 1 + t, c[t]] for t in range(len(c))]).mean())
        losses.append(F.cross_entropy(torch.stack(scores)[None], torch.tensor([e.answer])))
    return torch.stack(losses).mean()


def lora_model(root, kind, dtype):
    folder = make_tiny(kind, root)
    model = build_native(folder, read_config(folder), dtype, "cpu").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    loras = inject_lora(model, model.block_prefix, ["q_proj", "v_proj"], None, LoraArgs())
    with torch.no_grad():
        for m in loras.values():  # B = 0 at init would make every A-direction derivative zero
            m.lora_B.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    return model, loras


def lora_perturber(loras):
    return LoRAPerturber(loras, lora_trainable(loras))


def directional_derivative(model, exs, tr, seed):
    for t in tr.tensors:
        t.requires_grad_(True)
    loss = reference_loss(model, exs)
    grads = torch.autograd.grad(loss, tr.tensors)
    for t in tr.tensors:
        t.requires_grad_(False)
    return sum((g * z.to(g.dtype)).sum() for g, z in zip(grads, directions(tr, seed)))


@pytest.mark.parametrize("varlen", [False, True], ids=["mask", "varlen"])
@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_lora_rows_estimate_matches_autograd(root, kind, varlen):
    model, loras = lora_model(root, kind, torch.float64)
    exs, seed = examples(), 1234
    engine = NativeEngine(model, varlen=varlen)
    b = engine.batch(exs)
    want = directional_derivative(model, exs, lora_trainable(loras), seed).item()
    errs = []
    for eps in (1e-3, 1e-4):
        _, _, g = estimate(lambda rows: row_losses(engine.scores(b, rows), b, "candidate"), lora_perturber(loras), [seed], eps)
        errs.append(abs(g[0] - want))
    assert_second_order(errs, want)


def assert_second_order(errs, want):
    """SPSA's error is O(ε²): a 10× smaller ε cuts it ~100× (down to float64 rounding, ~1e-12/ε)."""
    assert abs(want) > 1e-3  # a real signal, so the comparison means something
    assert errs[1] < errs[0] / 30 + 1e-8, errs
    assert errs[1] < 1e-4 * abs(want), (errs, want)


@pytest.mark.parametrize("varlen", [False, True], ids=["mask", "varlen"])
@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_full_inplace_estimate_matches_autograd(root, kind, varlen):
    folder = make_tiny(kind, root)
    model = build_native(folder, read_config(folder), torch.float64, "cpu").eval()
    tr = full_trainable(model, [f"{model.block_prefix}.1", f"{model.block_prefix}.2"])
    exs, seed = examples(1), 99
    engine = NativeEngine(model, first_trained=1, varlen=varlen)
    b = engine.batch(exs)
    before = [t.clone() for t in tr.tensors]
    want = directional_derivative(model, exs, tr, seed).item()
    errs = []
    # |z| ~ sqrt(#params) is large here and OPT's ReLU has kinks, so ε must be smaller than for LoRA
    for eps in (1e-5, 1e-6):
        _, _, g = estimate(lambda rows: row_losses(engine.scores(b, rows), b, "candidate"), InPlacePerturber(tr), [seed], eps)
        errs.append(abs(g[0] - want))
    assert_second_order(errs, want)
    for a, t in zip(before, tr.tensors):  # restored (float64: to ~1e-16)
        torch.testing.assert_close(a, t, rtol=0, atol=1e-12)


@pytest.mark.parametrize("varlen", [False, True], ids=["mask", "varlen"])
@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_batched_rows_equal_two_separate_unpacked_passes(root, kind, varlen):
    """zoft's one batched forward gives the same L₊, L₋ as MeZO's two passes with perturbed weights
    (the packed rows attending through the block-diagonal mask, or as varlen sequences)."""
    model, loras = lora_model(root, kind, torch.float32)
    exs, seed, eps = examples(2), 7, 1e-2
    engine = NativeEngine(model, varlen=varlen)
    b = engine.batch(exs)
    lp, lm, _ = estimate(lambda rows: row_losses(engine.scores(b, rows), b, "candidate"), lora_perturber(loras), [seed], eps)
    tr = lora_trainable(loras)
    with torch.no_grad():
        perturb_(tr, seed, eps)
        ref_p = reference_loss(model, exs).item()
        perturb_(tr, seed, -2 * eps)
        ref_m = reference_loss(model, exs).item()
    assert abs(lp.item() - ref_p) < 1e-5 and abs(lm.item() - ref_m) < 1e-5
    assert abs(ref_p - ref_m) > 1e-5  # the two passes differ, so this compares something


def test_logits_only_candidate_loss_is_exact(root):
    """One-token candidates: the CE over candidate logits equals the CE over full log-softmax scores."""
    model, loras = lora_model(root, "llama", torch.float32)
    exs = [Encoded(e.prompt_ids, [c[:1] for c in e.cand_ids], e.answer, "mc") for e in examples(3)]
    engine = NativeEngine(model)
    b = engine.batch(exs)
    assert b.single_token
    full = row_losses(engine.scores(b, 1), b, "candidate")
    rows_only = row_losses(engine.scores(b, 1, logits_only=True), b, "candidate")
    torch.testing.assert_close(full, rows_only, rtol=1e-5, atol=1e-6)


def test_noise_is_seeded_private_and_chunk_consistent():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    t = torch.zeros(3_000_000)  # spans three generation chunks
    add_noise_(t, 42, 1.0)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is never touched
    assert torch.equal(noise(t, 42), t)
    assert not torch.equal(noise(t, 43), t)
    assert abs(t.mean().item()) < 5e-3 and abs(t.std().item() - 1) < 5e-3


def test_perturb_restore_returns_start_within_rounding():
    t = torch.randn(100_000)
    start = t.clone()
    for scale in (1e-3, -2e-3, 1e-3):
        add_noise_(t, 5, scale)
    # three float32 adds of terms of size ~1e-3·|z|: error below a few ulps of the values involved
    assert (t - start).abs().max().item() < 4e-7 * (1 + start.abs().max().item())


def test_update_applies_weight_decay_by_module_type_only(root):
    s = load_session(ModelConfig(model=make_tiny("opt", root)))
    attach(s, ZOConfig(mode="full", layers="1"))
    names = dict(zip(s.trainable.names, s.trainable.decay))
    assert names["model.decoder.layers.1.fc1.weight"] is True
    assert names["model.decoder.layers.1.fc1.bias"] is False
    assert names["model.decoder.layers.1.final_layer_norm.weight"] is False
    before = {n: t.clone() for n, t in zip(s.trainable.names, s.trainable.tensors)}
    sgd_update_(s.trainable, [11], [0.0], lr=0.1, weight_decay=0.5)  # g = 0: only decay moves anything
    after = dict(zip(s.trainable.names, s.trainable.tensors))
    torch.testing.assert_close(after["model.decoder.layers.1.fc1.weight"], before["model.decoder.layers.1.fc1.weight"] * 0.95)
    assert torch.equal(after["model.decoder.layers.1.final_layer_norm.weight"],
                       before["model.decoder.layers.1.final_layer_norm.weight"])


@pytest.mark.parametrize("mode,layers,master,trained", [("lora", "", "auto", torch.float32),
                                                         ("full", "2", "float32", torch.float32),
                                                         ("full", "2", "auto", torch.bfloat16),
                                                         ("full", "", "auto", torch.bfloat16)])
def test_bfloat16_base_trained_dtype(root, mode, layers, master, trained):
    """A bf16 base runs (the CPU path too). LoRA factors are float32; full mode trains the bf16 weights
    themselves (the only copy), or a float32 master with --master-dtype float32."""
    from zoft.train.step import step_losses
    from zoft.zo.trainable import direction_seeds

    s = load_session(ModelConfig(model=make_tiny("opt", root), dtype="bfloat16"))
    attach(s, ZOConfig(mode=mode, layers=layers, master_dtype=master))
    assert all(t.dtype == trained for t in s.trainable.tensors)
    assert s.model.model.decoder.layers[0].fc1.weight.dtype == torch.bfloat16
    from zoft.session import make_engine

    lp, lm, g = step_losses(make_engine(s), s, examples(4), "candidate", direction_seeds(0, 0, 1), 1e-2)
    assert torch.isfinite(lp).all() and torch.isfinite(lm).all() and lp.item() != lm.item()


def test_next_batch_packed_during_the_step_changes_nothing(root):
    """The train loop packs batch i+1 while step i's forward runs: same losses and parameters as packing
    each batch when its step starts, and the packed batch handed over is the next step's."""
    from zoft.session import make_engine
    from zoft.train.step import step_losses
    from zoft.zo.trainable import direction_seeds
    from zoft.zo.update import sgd_update_

    batches = [examples(1), examples(2), examples(3)]

    def run(prefetch):
        s = load_session(ModelConfig(model=make_tiny("llama", root)))
        attach(s, ZOConfig(mode="lora"), seed=0)
        eng, ahead, out = make_engine(s), {}, []
        for i, b in enumerate(batches):
            seeds = direction_seeds(0, i, 2)
            if prefetch:
                packed = ahead.pop("packed", None)
                assert (packed is None) == (i == 0)
                nxt = batches[i + 1] if i + 1 < len(batches) else None
                lp, lm, g = step_losses(eng, s, b, "candidate", seeds, 1e-2, packed=packed, next_batch=nxt, ahead=ahead)
            else:
                lp, lm, g = step_losses(eng, s, b, "candidate", seeds, 1e-2)
            sgd_update_(s.trainable, seeds, g, 0.1, 0.0)
            out.append(torch.cat([lp, lm]))
        return torch.stack(out), [t.detach().clone() for t in s.trainable.tensors]

    a, ta = run(False)
    b, tb = run(True)
    assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ta, tb, strict=True))


@pytest.mark.parametrize("layers", ["blocks", "all"])
@pytest.mark.parametrize("varlen", [False, True], ids=["mask", "varlen"])
@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_full_rows_equal_inplace_passes_and_autograd(root, kind, varlen, layers):
    """Full mode as rows of one forward (each Linear's row blocks with W ± εZ, per-row norms, perturbed
    embedding and head rows) gives the in-place passes' L₊, L₋ for two directions, matches autograd to
    O(ε²), and never modifies θ: for two trained blocks, and for every parameter (embeddings and the
    tied LM head included)."""
    folder = make_tiny(kind, root)
    model = build_native(folder, read_config(folder), torch.float64, "cpu").eval()
    blocks = [f"{model.block_prefix}.1", f"{model.block_prefix}.2"]
    tr = full_trainable(model, blocks if layers == "blocks" else None)
    assert any(t.dim() == 1 for t in tr.tensors)  # norms and biases are perturbed too
    exs, seeds = examples(1), [99, 123]
    engine = NativeEngine(model, first_trained=1 if layers == "blocks" else 0, varlen=varlen)
    b = engine.batch(exs)
    before = [t.clone() for t in tr.tensors]
    row_fn = lambda rows: row_losses(engine.scores(b, rows), b, "candidate")
    rows = FullRowsPerturber(model, tr)
    assert rows.perturbs_embeddings == (layers == "all")
    lp, lm, g = estimate(row_fn, rows, seeds, 1e-3)
    assert all(torch.equal(a, t) for a, t in zip(before, tr.tensors))  # θ untouched, bitwise
    lp2, lm2, g2 = estimate(row_fn, InPlacePerturber(tr), seeds, 1e-3)
    torch.testing.assert_close(lp, lp2, rtol=0, atol=1e-12)
    torch.testing.assert_close(lm, lm2, rtol=0, atol=1e-12)
    want = directional_derivative(model, exs, tr, seeds[0]).item()
    errs = [abs(estimate(row_fn, rows, seeds[:1], eps)[2][0].item() - want) for eps in (1e-5, 1e-6)]
    assert_second_order(errs, want)


def test_full_rows_lm_loss_and_generation_rows(root):
    """Rows that perturb the LM head in full (the LM loss reads every vocabulary row) equal the in-place
    passes; greedy decoding under FullRows gives each row block the tokens of its own perturbed model."""
    folder = make_tiny("llama", root)
    model = build_native(folder, read_config(folder), torch.float64, "cpu").eval()
    tr = full_trainable(model, None)
    engine = NativeEngine(model)
    b = engine.batch(examples(3), gold_only=True)
    row_fn = lambda rows: row_losses(engine.scores(b, rows), b, "lm")
    lp, lm, _ = estimate(row_fn, FullRowsPerturber(model, tr), [5], 1e-3)
    lp2, lm2, _ = estimate(row_fn, InPlacePerturber(tr), [5], 1e-3)
    torch.testing.assert_close(torch.stack([lp, lm]), torch.stack([lp2, lm2]), rtol=0, atol=1e-12)
    prompt = examples(3)[0].prompt_ids
    big = 0.3  # large enough that the two perturbed models disagree somewhere
    rows = FullRowsPerturber(model, tr).rows([5], big)
    got = model.generate(prompt, 6, set(), rows)
    want = []
    for scale in (big, -big):
        perturb_(tr, 5, scale)
        want.append(model.generate(prompt, 6, set())[0])
        perturb_(tr, 5, -scale)
    assert got == want and want[0] != want[1]


def test_full_rows_on_the_fallback_is_refused(root, tmp_path):
    from zoft.errors import ZoftError

    s = load_session(ModelConfig(model=make_tiny("opt", root), engine="hf"))
    with pytest.raises(ZoftError, match="--full-step rows needs a native model"):
        attach(s, ZOConfig(mode="full", full_step="rows"))
    s = load_session(ModelConfig(model=make_tiny("opt", root), engine="hf"))
    attach(s, ZOConfig(mode="full"))
    assert s.full_step == "inplace" and isinstance(s.perturber, InPlacePerturber)


# ---- LoRA-FA (--lora-freeze-a): A held at its initialisation, z and the update on B only -------------------


def test_lora_fa_estimate_matches_autograd_over_b_only(root):
    """With every A frozen, z is zero on the A factors, and the rows estimate is the directional derivative
    along z_B alone, to O(ε²)."""
    model, loras = lora_model(root, "llama", torch.float64)
    for m in loras.values():
        m.train_a = False
    tr = lora_trainable(loras)
    assert tr.fixed == [True, False] * len(loras) and tr.decay == [False, True] * len(loras)
    exs, seed = examples(), 99
    for i, z in enumerate(directions(tr, seed)):
        assert (z == 0).all() if i % 2 == 0 else (z != 0).all()
    engine = NativeEngine(model)
    b = engine.batch(exs)
    want = directional_derivative(model, exs, tr, seed).item()
    errs = []
    for eps in (1e-3, 1e-4):
        _, _, g = estimate(lambda rows: row_losses(engine.scores(b, rows), b, "candidate"), lora_perturber(loras), [seed], eps)
        errs.append(abs(g[0] - want))
    assert_second_order(errs, want)


@pytest.mark.parametrize("optimizer", ["zo-sgd", "adamw"])
def test_lora_fa_trains_b_and_keeps_a_bitwise(root, tmp_path, optimizer):
    """End to end through `zoft train --lora-freeze-a` (with weight decay, which must spare A too): the
    saved adapter's A factors are exactly a fresh session's, its B factors moved."""
    folder = make_tiny("opt", root)
    out = tmp_path / "run"
    argv = ["train", "--model", folder, "--task", "rotten_tomatoes", "--n-train", "16", "--n-dev", "0",
            "--n-test", "4", "--batch-size", "4", "--device", "cpu", "--steps", "3", "--lr", "0.05",
            "--weight-decay", "0.5", "--lora-freeze-a", "--optimizer", optimizer, "--no-zero-shot",
            "--output-dir", str(out)]
    p = subprocess.run([sys.executable, "-m", "zoft", *argv], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    fresh = load_session(ModelConfig(model=folder, device="cpu"))
    attach(fresh, ZOConfig(lora_freeze_a=True))
    n_a = n_b = 0
    for path, m in fresh.loras.items():
        a = [t for k, t in saved.items() if k.endswith(f"{path}.lora_A.weight")]
        bb = [t for k, t in saved.items() if k.endswith(f"{path}.lora_B.weight")]
        assert len(a) == len(bb) == 1, path
        assert torch.equal(a[0], m.lora_A.detach()), f"{path}: A moved"
        n_a += 1
        n_b += int(bb[0].abs().sum() > 0)
    assert n_a == len(fresh.loras) and n_b == n_a  # every B left zero
    cfg = json.loads((out / "zoft_config.json").read_text())
    assert cfg["zo"]["lora_freeze_a"] is True
    if optimizer == "zo-sgd":  # the step log alone rebuilds it: replay re-makes the same masked z
        r = tmp_path / "replay"
        p = subprocess.run([sys.executable, "-m", "zoft", "replay", "--model", folder, "--log", str(out / "steps.jsonl"),
                            "--output-dir", str(r)], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
        rebuilt = load_file(r / "adapter_model.safetensors")
        assert rebuilt.keys() == saved.keys() and all(torch.equal(rebuilt[k], saved[k]) for k in saved)
    assert cfg["resolved"]["trainable_parameters"] == sum(m.lora_B.numel() for m in fresh.loras.values())
