"""`zoft train --config FILE`: YAML/JSON options under the flags, a run's zoft_config.json re-running the run
bitwise, HF-style aliases, and validation in the dataclasses whoever builds them."""

import json
import subprocess

import pytest

from tests.test_cli import assert_user_error
from tests.tiny import make_tiny
from zoft.config import ModelConfig, RunConfig, TaskConfig, ZOConfig
from zoft.errors import ZoftError


@pytest.fixture(scope="module")
def opt(tmp_path_factory) -> str:
    return make_tiny("opt", str(tmp_path_factory.mktemp("cfg")))


@pytest.fixture
def zoft_here(capsys):
    def run(*args):
        from zoft.cli import main

        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


SMALL = ["--task", "rotten_tomatoes", "--n-train", "16", "--n-dev", "8", "--n-test", "8", "--device", "cpu",
         "--batch-size", "4", "--no-zero-shot", "--log-every", "0"]


def adapter_bytes(run) -> bytes:
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def test_run_config_reruns_the_run_bitwise(opt, tmp_path, zoft_here):
    a, b = tmp_path / "a", tmp_path / "b"
    p = zoft_here("train", "--model", opt, *SMALL, "--steps", "4", "--lr", "0.05", "--layers", "top2",
                  "--output-dir", a)
    assert p.returncode == 0, p.stderr
    p = zoft_here("train", "--config", a / "zoft_config.json", "--output-dir", b)  # flags override the file
    assert p.returncode == 0, p.stderr
    assert adapter_bytes(a) == adapter_bytes(b)
    ca, cb = (json.loads((d / "zoft_config.json").read_text()) for d in (a, b))
    assert ca["run"].pop("output_dir") != cb["run"].pop("output_dir") and ca == cb
    assert [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]


def test_yaml_flat_with_aliases_and_override(opt, tmp_path, zoft_here):
    (tmp_path / "run.yaml").write_text(
        f"model-name-or-path: {opt}\ntask: rotten_tomatoes\nlearning_rate: 0.05\nmax-steps: 3\n"
        "n_train: 16\nn_test: 8\ndevice: cpu\nbatch_size: 4\nzero_shot: false\nlayers: top1\n")
    p = zoft_here("train", "--config", tmp_path / "run.yaml", "--max-steps", "2", "--output-dir", tmp_path / "r")
    assert p.returncode == 0, p.stderr
    cfg = json.loads((tmp_path / "r" / "zoft_config.json").read_text())
    assert cfg["zo"]["lr"] == 0.05 and cfg["run"]["steps"] == 2 and cfg["model"]["model"] == opt
    assert cfg["zo"]["layers"] == "top1" and cfg["run"]["zero_shot"] is False


@pytest.mark.parametrize("text, needles", [
    ("lerning_rate: 0.1\n", ["run.yaml", "unknown option 'lerning_rate'", "learning_rate"]),
    ("mode: LoRA\n", ["--mode 'LoRA'", "lora, full"]),
    ("steps: [1, 2]\n", ["--steps must be int"]),
    ("- a\n", ["expected a mapping"]),
    ("a: [\n", ["not valid YAML"]),
])
def test_bad_config_files(tmp_path, zoft_here, text, needles):
    (tmp_path / "run.yaml").write_text(text)
    assert_user_error(zoft_here("train", "--config", tmp_path / "run.yaml"), *needles)


def test_dataclasses_validate_whoever_builds_them():
    with pytest.raises(ZoftError, match="--mode 'LoRA' is not one of lora, full"):
        ZOConfig(mode="LoRA")
    with pytest.raises(ZoftError, match="--report-to 'tensorbored'"):
        RunConfig(report_to=["tensorbored"])
    with pytest.raises(ZoftError, match="--dtype 'fp16'"):
        ModelConfig(dtype="fp16")
    with pytest.raises(ZoftError, match="--n-train must be int"):
        TaskConfig(n_train="5")
    assert ZOConfig(lr=1).lr == 1.0 and isinstance(ZOConfig(lr=1).lr, float)


def test_version_and_help_defaults(zoft_here):
    import zoft

    p = zoft_here("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"zoft {zoft.__version__}"
    for cmd in ("eval", "export", "plot", "replay"):
        assert "(default:" in zoft_here(cmd, "--help").stdout, cmd
    demo = " ".join(zoft_here("demo", "--help").stdout.split())
    assert "(default: 900)" in demo and "(default: top4)" in demo and "(default: runs/demo)" in demo


def test_demo_takes_argv_from_main(opt, tmp_path, zoft_here):
    """zoft.cli.main(["demo", ...]) reads its argument list, not sys.argv; unset options keep the demo's preset."""
    p = zoft_here("demo", "--steps", "5", "--model", opt, "--layers", "top1", "--n-train", "16", "--n-dev", "8",
                  "--n-test", "8", "--eval-every", "0", "--no-zero-shot", "--device", "cpu", "--output-dir", tmp_path / "d")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1])["steps"] == 5
    cfg = json.loads((tmp_path / "d" / "zoft_config.json").read_text())
    assert cfg["zo"]["lr"] == 5e-3 and cfg["zo"]["batch_size"] == 16 and cfg["run"]["steps"] == 5


def test_preset_names_mean_the_same_model_everywhere(zoft_here, monkeypatch):
    from zoft.session import peft_base, resolve_alias

    assert resolve_alias("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M" == peft_base("smollm2-135m", "/x")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = zoft_here("train", "--model", "smollm2-135m", "--task", "rotten_tomatoes", "--device", "cpu")
    assert_user_error(p, "HuggingFaceTB/SmolLM2-135M", "hub")  # known, fetched from the hub (offline here)


def test_gpt2_conv1d_takes_lora_and_peft_loads_it(tmp_path, zoft_here):
    """GPT-2-style models (transformers' Conv1D, a transposed Linear) take LoRA through the fallback: the
    default q/v targets map to the fused c_attn (as peft's default does), the adapter is saved with
    fan_in_fan_out, and peft's model gives zoft's logits; a target no layer has is one error line."""
    import json

    import peft
    import torch
    import transformers

    from tests.helpers_tok import gpt2_tokenizer
    from tests.tiny import VOCAB
    from zoft.config import ModelConfig, ZOConfig
    from zoft.lora import load_peft_weights
    from zoft.session import attach, load_session

    folder = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    gpt2_tokenizer().save_pretrained(folder)
    p = zoft_here("train", "--model", folder, "--task", "rotten_tomatoes", "--n-train", "8", "--n-test", "4",
                  "--device", "cpu", "--steps", "3", "--batch-size", "4", "--lr", "0.5", "--no-zero-shot",
                  "--output-dir", tmp_path / "r")
    assert p.returncode == 0, p.stderr
    adapter = tmp_path / "r" / "adapter"
    ac = json.loads((adapter / "adapter_config.json").read_text())
    assert ac["target_modules"] == ["c_attn"] and ac["fan_in_fan_out"] is True
    s = load_session(ModelConfig(model=str(folder), device="cpu"))
    attach(s, ZOConfig(mode="lora"))
    load_peft_weights(s.loras, str(adapter))
    assert any(m.lora_B.abs().sum() > 0 for m in s.loras.values())  # trained: B moved off its zeros
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        ours = s.model(ids).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(folder)
        theirs = peft.PeftModel.from_pretrained(base, str(adapter)).eval()(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    p = zoft_here("train", "--model", folder, "--task", "rotten_tomatoes", "--n-train", "8", "--n-test", "4",
                  "--device", "cpu", "--lora-targets", "k_proj", "--output-dir", tmp_path / "x")
    msg = assert_user_error(p, "k_proj", "c_attn", "--mode full")
    assert "q" in msg
    p = zoft_here("train", "--model", folder, "--task", "rotten_tomatoes", "--n-train", "8", "--n-test", "4",
                  "--device", "cpu", "--mode", "full", "--steps", "2", "--batch-size", "4", "--no-zero-shot",
                  "--output-dir", tmp_path / "f")
    assert p.returncode == 0, p.stderr  # full mode trains every parameter, Conv1D included
