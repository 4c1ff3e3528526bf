"""What a run leaves for the Hugging Face tools: an adapter AutoPeftModelForCausalLM loads from anywhere
(absolute base path, model card), and `export` in the base checkpoint's dtype with the tokenizer beside it."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from tests.tiny import make_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A bfloat16 tiny Llama, trained for 3 LoRA steps from a relative --model path."""
    import transformers

    root = tmp_path_factory.mktemp("out")
    src = make_tiny("llama", str(root / "f32"))
    bf16 = root / "work" / "base-bf16"
    transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(bf16)
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(bf16)
    from zoft.cli import main

    cwd = os.getcwd()
    os.chdir(root / "work")
    try:
        main(["train", "--model", "base-bf16", "--task", "rotten_tomatoes", "--n-train", "8", "--n-test", "4",
              "--batch-size", "4", "--steps", "3", "--lr", "0.05", "--device", "cpu", "--no-zero-shot",
              "--output-dir", "r"])
    finally:
        os.chdir(cwd)
    return root / "work" / "r", bf16


def test_auto_peft_model_loads_the_adapter(run, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    out, base = run
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)  # absolute, though the run was given "base-bf16"
    monkeypatch.chdir(tmp_path)  # elsewhere: a relative path would no longer resolve
    auto = AutoPeftModelForCausalLM.from_pretrained(str(out / "adapter"), dtype=torch.float32).eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                    str(out / "adapter")).eval()
    ids = torch.tensor([[50256, 464, 3807, 373, 1049]])
    with torch.no_grad():
        a, b = auto(input_ids=ids).logits, ref(input_ids=ids).logits
        plain = ref.get_base_model()
        with ref.disable_adapter():
            c = plain(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.allclose(a, c)  # the adapter is loaded, and it changes the output
    card = (out / "adapter" / "README.md").read_text()
    assert f"base_model: {base}" in card and "rotten_tomatoes" in card and "MeZO" in card
    assert "final_accuracy" in card and f"zoft train --config {out / 'zoft_config.json'}" in card


def test_export_keeps_the_base_dtype_and_writes_the_tokenizer(run, tmp_path):
    from zoft.cli import main

    out, _ = run
    for args, want in (([], torch.bfloat16), (["--dtype", "float32"], torch.float32)):
        dest = tmp_path / f"m{len(args)}"
        main(["export", str(out), "--merge", "--output-dir", str(dest), *args])
        with safe_open(str(dest / "model.safetensors"), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {want}
        assert (dest / "tokenizer.json").is_file() and (dest / "tokenizer_config.json").is_file()
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(dest).dtype == want
    main(["export", str(out), "--output-dir", str(tmp_path / "a")])  # the adapter alone, tokenizer beside it
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file() and (tmp_path / "a" / "tokenizer.json").is_file()
