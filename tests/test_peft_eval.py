"""Adapters that peft loads, merged weights, and eval scores, all checked against transformers/peft."""

import pytest
import torch
import transformers

from tests.tiny import make_tiny
from zoft.config import ModelConfig, ZOConfig
from zoft.evaluate import evaluate
from zoft.lora import merge_lora, save_peft
from zoft.session import attach, load_session, make_engine
from zoft.tasks import Example
from zoft.tasks.encode import encode

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tiny"))


def trained_session(folder, layers=""):
    s = load_session(ModelConfig(model=folder))
    attach(s, ZOConfig(mode="lora", layers=layers))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in s.loras.values():  # as if trained: non-zero B
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    return s


@pytest.mark.parametrize("kind,layers", [("opt", ""), ("llama", ""), ("llama", "1-2"), ("neox", "")])
def test_peft_loads_zoft_adapter_with_same_logits(root, tmp_path, kind, layers):
    folder = make_tiny(kind, root)
    s = trained_session(folder, layers)
    save_peft(s.loras, str(tmp_path / "adapter"), folder, s.target_names, s.lora_args)
    ids = torch.randint(3, 50000, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = s.model(ids) if s.native else s.model(input_ids=ids).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        ref = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        theirs = ref(input_ids=ids).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter changes something
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_merged_native_weights_load_in_transformers(root, tmp_path, kind):
    from safetensors.torch import save_file

    folder = make_tiny(kind, root)
    s = trained_session(folder)
    ids = torch.randint(3, 50000, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = s.model(ids)
    merge_lora(s.model)
    sd = {k: v.contiguous() for k, v in s.model.state_dict().items() if not (k == "lm_head.weight" and s.model.args.tie_word_embeddings)}
    out = tmp_path / "merged"
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(open(f"{folder}/config.json").read())
    with torch.no_grad():
        after = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(input_ids=ids).logits
    torch.testing.assert_close(before, after, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["opt", "llama", "neox"])
def test_eval_scores_match_direct_transformers_computation(root, kind):
    folder = make_tiny(kind, root)
    s = load_session(ModelConfig(model=folder))
    exs = [Example("the film was a triumph. It was", [" terrible", " great"], 1),
           Example("dull, slow and far too long It was", [" terrible", " great"], 0),
           Example("Question: is the sky blue? Answer:", [" yes, it is", " no"], 0)]
    enc, _ = encode(s.tokenizer, exs, None)
    rows = evaluate(make_engine(s), enc, batch_size=2)["rows"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for e, ex, row in zip(enc, exs, rows):
        assert row["answer"] == ex.answer and len(row["candidate_logprobs"]) == len(ex.candidates)
        for c, got in zip(e.cand_ids, row["candidate_logprobs"]):
            ids = torch.tensor([e.prompt_ids + c])
            with torch.no_grad():
                lp = ref(input_ids=ids).logits[0].log_softmax(-1)
            n = len(e.prompt_ids)
            want = sum(lp[n - 1 + t, c[t]].item() for t in range(len(c)))
            assert abs(got - want) < 1e-4, (got, want)
