"""Prefix tuning (`--mode prefix`): logits against peft's PREFIX_TUNING, the rows path against separate
forwards, the estimator against autograd, and a CLI run that resumes bitwise, replays, and loads in peft."""

import json
import os
import signal

import pytest
import torch
import transformers
from safetensors.torch import load_file

from tests.test_zo import assert_second_order, examples, reference_loss
from tests.tiny import make_tiny
from zoft.config import ModelConfig, ZOConfig
from zoft.errors import ZoftError
from zoft.prefix import save_prefix
from zoft.session import attach, load_session, make_engine
from zoft.tasks.encode import Encoded
from zoft.train.losses import row_losses
from zoft.zo.perturbers import estimate
from zoft.zo.trainable import directions

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny"))


def prefix_session(folder, engine="auto", tokens=5, double=False, seed=3):
    """A session in prefix mode whose θ is moved away from its initialisation (as if trained)."""
    s = load_session(ModelConfig(model=folder, engine=engine, device="cpu"))
    if double:
        s.model.double()
    attach(s, ZOConfig(mode="prefix", prefix_tokens=tokens), seed=seed)
    with torch.no_grad():
        s.prefix.theta.add_(torch.randn(s.prefix.theta.shape, generator=torch.Generator().manual_seed(0),
                                        dtype=s.prefix.theta.dtype) * 0.5)
    return s


def peft_model(folder, adapter):
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(base, adapter).eval()


def peft_cand_sums(ref, exs):
    """Σ log p(candidate tokens | prompt) per (example, candidate), one peft forward per sequence."""
    out = []
    with torch.no_grad():
        for e in exs:
            for c in e.cand_ids:
                ids = torch.tensor([e.prompt_ids + c])
                lp = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].log_softmax(-1)
                n = len(e.prompt_ids)
                out.append(sum(lp[n - 1 + t, c[t]] for t in range(len(c))))
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["opt", "opt350", "llama", "qwen2"])
def test_native_logits_equal_peft(root, tmp_path, kind):
    """The native forward with a prefix against PeftModel(PrefixTuningConfig) with our saved
    prompt_embeddings: keys/values layout (GQA: llama and qwen2 have 2 KV heads of 4) and positions."""
    folder = make_tiny(kind, root)
    s = prefix_session(folder)
    save_prefix(s.prefix, str(tmp_path / "adapter"), folder)
    ac = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert ac["peft_type"] == "PREFIX_TUNING" and ac["num_virtual_tokens"] == 5 and ac["num_layers"] == 3
    ids = torch.randint(3, 50000, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = peft_model(folder, str(tmp_path / "adapter"))
    with torch.no_grad():
        ours = s.model(ids)
        theirs = ref(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        plain = ref.get_base_model()(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-2  # the prefix changes the logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,engine,pack", [("opt", "auto", 1024), ("opt", "auto", 12), ("llama", "auto", 1024),
                                              ("opt", "hf", 0), ("llama", "hf", 0), ("neox", "auto", 0)])
def test_engine_scores_equal_peft(root, tmp_path, kind, engine, pack):
    """Candidate log-likelihoods through the engines (native: packed segments, prompts shared by the
    candidates, several segments in a row or, pack 12, one per row; the transformers fallback's
    DynamicCache) against peft's, one sequence per (example, candidate)."""
    folder = make_tiny(kind, root)
    s = prefix_session(folder, engine)
    assert s.native == (engine == "auto" and kind != "neox")
    save_prefix(s.prefix, str(tmp_path / "adapter"), folder)
    exs = examples()
    eng = make_engine(s, pack_tokens=pack or 1024)
    b = eng.batch(exs)
    if s.native:
        assert (b.packs.ids.shape[0] > 1) == (pack == 12)
    ours = eng.scores(b, 1).cand_sum[0]
    theirs = peft_cand_sums(peft_model(folder, str(tmp_path / "adapter")), exs)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,engine,pack", [("opt", "auto", 1024), ("opt", "auto", 12), ("llama", "auto", 1024),
                                              ("llama", "hf", 0)])
def test_rows_equal_separate_forwards(root, kind, engine, pack):
    """Row block k of one forward (2 directions: 4 row blocks) scores exactly as a separate forward with
    θ ± εz_j set as the prefix."""
    s = prefix_session(make_tiny(kind, root), engine)
    eng = make_engine(s, pack_tokens=pack or 1024)
    b = eng.batch(examples(1))
    seeds, eps = [11, 12], 0.05
    rows = s.perturber.rows(seeds, eps)
    batched = eng.scores(b, rows).cand_sum  # (4, C)
    theta = s.prefix.theta.detach().clone()
    for j, seed in enumerate(seeds):
        z = directions(s.trainable, seed)[0]
        for k, sign in enumerate((1, -1)):
            with torch.no_grad():
                s.prefix.theta.copy_(theta + sign * eps * z)
            alone = eng.scores(b, 1).cand_sum[0]
            torch.testing.assert_close(batched[2 * j + k], alone, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        s.prefix.theta.copy_(theta)
    assert (batched[0] - batched[1]).abs().max() > 1e-4  # the signs differ: the rows are perturbed


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_estimate_matches_autograd(root, kind):
    """g = (L₊ − L₋)/2ε from the rows matches autograd's ∇L·z in float64 to O(ε²)."""
    s = prefix_session(make_tiny(kind, root), double=True)
    exs, seed = examples(), 1234
    eng = make_engine(s)
    b = eng.batch(exs)
    tr = s.trainable
    tr.tensors[0].requires_grad_(True)
    (grad,) = torch.autograd.grad(reference_loss(s.model, exs), tr.tensors)
    tr.tensors[0].requires_grad_(False)
    want = (grad * directions(tr, seed)[0].to(grad.dtype)).sum().item()
    errs = []
    for eps in (1e-3, 1e-4):
        _, _, g = estimate(lambda rows: row_losses(eng.scores(b, rows), b, "candidate"), s.perturber, [seed], eps)
        errs.append(abs(g[0].item() - want))
    assert_second_order(errs, want)


def test_generation_with_prefix_equals_full_forward(root):
    """Greedy decoding with the KV cache (left-padded batch, positions shifted by the prefix) gives the
    tokens the full forward's argmax gives, step by step."""
    s = prefix_session(make_tiny("llama", root))
    prompts = [[5, 900, 31, 7], [44, 2000]]
    outs = s.model.generate_batch(prompts, 4, set())
    for p, out in zip(prompts, outs):
        seq = list(p)
        with torch.no_grad():
            for _ in range(4):
                seq.append(int(s.model(torch.tensor([seq]))[0, -1].argmax()))
        assert out == seq[len(p):]


def test_generation_rows_equal_separate_decodes(root):
    """MeZO's F1 objective decodes once per row: row block r decodes under its own prefix θ ± εz."""
    s = prefix_session(make_tiny("opt", root))
    rows = s.perturber.rows([5], 2.0)  # ε large enough that the two signs decode differently
    prompt = [5, 900, 31, 7]
    outs = s.model.generate(prompt, 4, set(), rows=rows)
    theta = s.prefix.theta.detach().clone()
    for r in range(rows.P):
        with torch.no_grad():
            s.prefix.theta.copy_(rows.bank[r].view_as(theta))
        assert outs[r] == s.model.generate(prompt, 4, set())[0]
    with torch.no_grad():
        s.prefix.theta.copy_(theta)
    assert outs[0] != outs[1]


def test_init_by_real_activations(root):
    """The initial prefix is the KV cache of P_v random vocabulary tokens (MeZO's init_by_real_act): the
    prefixed model scores a continuation as the plain model does after those tokens; the fallback's init
    is the same, and the draw is a function of the seed."""
    folder = make_tiny("llama", root)
    s = load_session(ModelConfig(model=folder, device="cpu"))
    attach(s, ZOConfig(mode="prefix", prefix_tokens=4), seed=9)
    from zoft.prefix import random_tokens

    ids = random_tokens(s.model.lm_head_weight.shape[0], 4, 9)
    text = torch.tensor([[17, 400, 9000, 23]])
    with torch.no_grad():
        prefixed = s.model(text)[0]
        s.model.prefix_len = 0
        for block in s.model.blocks:
            block.self_attn.zoft_prefix = None
        plain = s.model(torch.cat([ids[None], text], 1))[0, 4:]
    torch.testing.assert_close(prefixed, plain, rtol=1e-5, atol=1e-5)
    h = load_session(ModelConfig(model=folder, engine="hf", device="cpu"))
    attach(h, ZOConfig(mode="prefix", prefix_tokens=4), seed=9)
    torch.testing.assert_close(h.prefix.theta, s.prefix.theta, rtol=1e-5, atol=1e-5)
    other = load_session(ModelConfig(model=folder, device="cpu"))
    attach(other, ZOConfig(mode="prefix", prefix_tokens=4), seed=10)
    assert (other.prefix.theta - s.prefix.theta).abs().max() > 1e-2


# ---- the CLI: a run, SIGKILL and resume, replay, peft, eval, export ------------------------------------

RUN = ["--mode", "prefix", "--task", "rotten_tomatoes", "--n-train", "32", "--n-dev", "8", "--n-test", "8",
       "--batch-size", "4", "--device", "cpu", "--no-zero-shot", "--fsync-every", "2", "--steps", "12",
       "--save-every", "3", "--lr", "0.01"]


@pytest.fixture(scope="module")
def run(root):
    """An undisturbed prefix run on the tiny Llama (GQA) and its model folder."""
    from tests.test_faults import zoft

    model = make_tiny("llama", root)
    out = os.path.join(root, "ref-prefix")
    code, err = zoft("train", "--model", model, *RUN, "--output-dir", out)
    assert code == 0, err[-3000:]
    return model, out


def test_sigkill_resume_is_bitwise(run, tmp_path):
    from pathlib import Path

    from tests.test_faults import interrupt, same_run, zoft

    model, ref = run
    for stop in ("forward 5", "update 8", "tensors 6"):
        b = tmp_path / stop.replace(" ", "")
        args = ["train", "--model", model, *RUN, "--output-dir", b]
        status, err = interrupt(args, b, stop)
        assert status == -signal.SIGKILL, err[-3000:]
        code, err = zoft(*args, "--resume")
        assert code == 0, err[-3000:]
        assert not same_run(Path(ref), b, "lora"), same_run(Path(ref), b, "lora")


def test_replay_rebuilds_the_adapter(run, tmp_path):
    from tests.test_faults import zoft

    model, ref = run
    code, err = zoft("replay", "--model", model, "--log", f"{ref}/steps.jsonl", "--output-dir", tmp_path / "r")
    assert code == 0, err[-3000:]
    a = load_file(f"{ref}/checkpoint/adapter_model.safetensors")["prompt_embeddings"]
    r = load_file(str(tmp_path / "r" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(a, r)
    start = prefix_session(model, seed=0).prefix.theta  # moved by training
    assert (a - start).abs().max() > 0


def test_peft_loads_the_run_adapter_and_agrees_with_zoft_eval(run, capsys):
    """The run's adapter/ in peft: the same candidate scores as zoft's engine with the adapter loaded by
    `zoft eval --adapter` (through its load path), and the eval command runs."""
    from tests.test_faults import zoft
    from zoft.cli import load_trained

    model, ref = run
    s = load_session(ModelConfig(model=model, device="cpu"))

    class NS:
        adapter, run = f"{ref}/adapter", ""

    load_trained(s, NS)
    trained = load_file(f"{ref}/adapter/adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(s.prefix.theta, trained)
    exs = examples(2)
    eng = make_engine(s)
    ours = eng.scores(eng.batch(exs), 1).cand_sum[0]
    theirs = peft_cand_sums(peft_model(model, f"{ref}/adapter"), exs)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    code, out = zoft("eval", "--adapter", f"{ref}/adapter")
    assert code == 0 and '"accuracy"' in out, out[-3000:]


def test_export(run, tmp_path):
    from tests.test_faults import refused, zoft

    model, ref = run
    code, out = zoft("export", ref, "--merge", "--output-dir", tmp_path / "m")
    assert "cannot be folded" in (refused(code, out) or ""), out[-2000:]
    assert not (tmp_path / "m").exists()
    code, out = zoft("export", ref, "--output-dir", tmp_path / "a")
    assert code == 0, out[-2000:]
    assert torch.equal(load_file(str(tmp_path / "a" / "adapter_model.safetensors"))["prompt_embeddings"],
                       load_file(f"{ref}/adapter/adapter_model.safetensors")["prompt_embeddings"])


@pytest.mark.parametrize("flags,words", [
    (["--prefix-tokens", "0"], "--prefix-tokens must be at least 1"),
    (["--prefix-tokens", "-3"], "--prefix-tokens must be at least 1"),
    (["--layers", "top1"], "--layers top1 with --mode prefix"),
    (["--attention", "varlen"], "--attention varlen with --mode prefix"),
    (["--prefix-tokens", "300"], "leaves no positions"),
])
def test_bad_input_is_one_clear_error(root, tmp_path, flags, words):
    from tests.test_faults import refused, zoft

    model = make_tiny("opt", root)
    code, out = zoft("train", "--model", model, *RUN, *flags, "--output-dir", tmp_path / "x")
    msg = refused(code, out)
    assert msg is not None and words in msg, out[-2000:]


def test_adapter_for_another_model_is_refused(root, tmp_path):
    s = prefix_session(make_tiny("opt", root))
    save_prefix(s.prefix, str(tmp_path / "a"), "opt")
    other = load_session(ModelConfig(model=make_tiny("llama", root), device="cpu"))
    attach(other, ZOConfig(mode="prefix"))
    from zoft.prefix import load_prefix

    with pytest.raises(ZoftError, match="another model"):
        load_prefix(other.prefix, str(tmp_path / "a"))
    assert isinstance(examples()[0], Encoded)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_method_query_rows_equal_separate_forwards(root, kind):
    """A --optimizer method's rows over the prefix (FZOO: θ itself, then θ + εu_j; ZO-Adam: θ ± εz) score
    exactly as separate forwards with that prefix set."""
    from zoft.zo.methods import make_method
    from zoft.zo.trainable import direction_seeds

    s = prefix_session(make_tiny(kind, root))
    eng = make_engine(s, pack_tokens=1024)
    b = eng.batch(examples(1))
    theta = s.prefix.theta.detach().clone()
    for name, n in (("fzoo", 3), ("zo-adam", 1)):
        method = make_method(ZOConfig(mode="prefix", optimizer=name, directions=n), s.trainable, 5)
        q = method.query(s.trainable, direction_seeds(5, 1, n), 1, 0.05)
        batched = eng.scores(b, s.perturber.query_rows(q)).cand_sum
        assert batched.shape[0] == len(q.dir) == method.rows(n)
        for r, (c, d) in enumerate(zip(q.coef, q.dir)):
            with torch.no_grad():
                s.prefix.theta.copy_(theta if d < 0 else theta + c * q.u[d].view_as(theta).to(theta.dtype))
            torch.testing.assert_close(batched[r], eng.scores(b, 1).cand_sum[0], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            s.prefix.theta.copy_(theta)
        assert (batched[0] - batched[-1]).abs().max() > 1e-4  # the rows differ: they are perturbed
