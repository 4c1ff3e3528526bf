"""`python -m zoft train | eval | export` end to end on tiny random checkpoints, and its one-line errors.

Commands run as subprocesses, as a user runs them. Each pays ~3 s of imports, so the training runs
the tests share start together, two at a time, in the `runs` fixture, and most error cases go through
zoft.cli.main in-process.
"""

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import make_tiny

# one thread per process: tiny models gain nothing from more, and on a busy 2-core machine it is ~35% faster
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
DATA = "--task rotten_tomatoes --n-train 32 --n-dev 16 --n-test 16 --batch-size 4 --device cpu".split()
TRAIN = DATA + ["--eval-every", "3", "--save-every", "3"]
MODES = {  # LoRA with a large lr so the adapter moves the logits visibly in 6 steps (export test)
    "lora": ["--lr", "0.05"],
    "full": ["--mode", "full", "--layers", "1-2"],
}
PATHS = {"opt": "native opt", "llama": "native llama", "neox": "transformers fallback"}


def zoft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zoft", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300)


@pytest.fixture
def zoft_here(capsys):
    """zoft() in this process: the same argv through zoft.cli.main, minus ~3 s of imports per call.

    For the many error cases; a few of them also run as real subprocesses. An exception zoft fails to
    turn into a one-line error propagates here and fails the test with its traceback.
    """

    def run(*args: str) -> subprocess.CompletedProcess:
        from zoft.cli import main

        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def last_json(p: subprocess.CompletedProcess) -> dict:
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_user_error(p: subprocess.CompletedProcess, *needles: str, line_start: bool = True) -> str:
    """Exit 2, no traceback, and one `zoft: error: ...` message naming every needle; returns the message.

    line_start=False tolerates the message following an unfinished progress bar on the same line.
    """
    assert p.returncode == 2, f"exit {p.returncode}\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if "zoft: error: " in line]
    assert len(lines) == 1 and "error" not in p.stderr.replace(lines[0], "").lower(), p.stderr
    if line_start:
        assert lines[0].startswith("zoft: error: "), lines[0]
    msg = lines[0][lines[0].index("zoft: error: ") :]
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def models(root) -> dict[str, str]:
    return {kind: make_tiny(kind, str(root)) for kind in PATHS}


@pytest.fixture(scope="module")
def runs(root, models):
    """runs(name) -> (run folder, finished `zoft train` process).

    All of them start when the first test asks for one, two at a time (each process is single-threaded).
    """
    six = [*TRAIN, "--steps", "6"]
    argv = {
        "opt-lora": ["--model", models["opt"], *six, *MODES["lora"]],
        "opt-full": ["--model", models["opt"], *six, *MODES["full"], "--full-step", "inplace"],
        "llama-lora": ["--model", models["llama"], *six, *MODES["lora"]],
        "llama-full": ["--model", models["llama"], *six, *MODES["full"]],  # rows: the default on native models
        # --max-length 16: most prompts are longer, so truncation gets counted
        "neox-lora": ["--model", models["neox"], *six, *MODES["lora"], "--max-length", "16"],
        "resume-b": ["--model", models["opt"], *TRAIN, *MODES["lora"], "--steps", "3"],  # opt-lora's start
        # lr 1e30, full mode: each update blows the weights up, the next loss is non-finite, the guard undoes
        # the update and halves lr, and after --guard-strikes (default 3) strikes the run stops
        "diverged": ["--model", models["opt"], *DATA, "--mode", "full", "--lr", "1e30", "--steps", "12"],
    }
    with ThreadPoolExecutor(2) as pool:
        jobs = {name: pool.submit(zoft, "train", *args, "--output-dir", root / name)
                for name, args in argv.items()}
        yield lambda name: (root / name, jobs[name].result())


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[50256, 40, 1842, 428, 3807, 13, 632, 373, 1049]])


# ---- help --------------------------------------------------------------------------------------


def test_help():
    p = zoft("--help")
    assert p.returncode == 0 and all(c in p.stdout for c in ("train", "eval", "export"))
    exe = Path(sys.executable).parent / "zoft"
    if not exe.is_file():
        pytest.skip("no `zoft` entry point next to this interpreter (not pip-installed)")
    p = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, env=ENV, timeout=60)
    assert p.returncode == 0 and "usage: zoft train" in p.stdout
    assert "--lora-targets" in p.stdout and "--resume" in p.stdout


# ---- train ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,mode", [("opt", "lora"), ("opt", "full"), ("llama", "lora"),
                                       ("llama", "full")])
def test_train(runs, kind, mode):
    out, p = runs(f"{kind}-{mode}")
    r = last_json(p)
    assert r["steps"] == 6 and r["seconds"] > 0
    assert 0 <= r["zero_shot_accuracy"] <= 1 and 0 <= r["final_accuracy"] <= 1
    assert PATHS[kind] in p.stderr
    if mode == "full":  # opt-full runs MeZO's in-place passes, llama-full the one-forward rows
        assert ("±ε as rows of one forward" if kind == "llama" else "perturbed in place") in p.stderr

    cfg = json.loads((out / "zoft_config.json").read_text())
    assert cfg["zo"]["mode"] == mode and cfg["run"]["steps"] == 6
    assert cfg["resolved"]["path"] == PATHS[kind] and cfg["resolved"]["trainable_parameters"] > 0
    assert cfg["resolved"]["layers"] == ([1, 2] if mode == "full" else None)

    steps = [row for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]
    assert [row["step"] for row in steps] == [1, 2, 3, 4, 5, 6]
    for row in steps:
        assert {"step", "loss", "projected_grad", "lr", "seconds"} <= set(row)
        assert row["loss"] > 0 and row["lr"] > 0
    dev = [row for row in read_jsonl(out / "metrics.jsonl") if "dev_accuracy" in row]
    assert [row["step"] for row in dev] == [3, 6]

    assert json.loads((out / "checkpoint" / "state.json").read_text())["next_step"] == 6
    if mode == "lora":
        assert (out / "adapter" / "adapter_config.json").is_file()
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        saved = load_file(out / "checkpoint" / "adapter_model.safetensors")  # step 6 (adapter/ is the best dev's)
        groups = {k: [t for n, t in saved.items() if f".{k}." in n] for k in ("lora_A", "lora_B")}
    else:
        assert (out / "checkpoint" / "trained.safetensors").is_file() and not (out / "adapter").exists()
        groups = {"theta": list(load_file(out / "checkpoint" / "trained.safetensors").values())}
    # each dev line carries ‖θ‖ by kind, here checked against what the last step saved
    for k, ts in groups.items():
        assert ts and dev[-1][f"norm_{k}"] == pytest.approx(math.sqrt(sum(float(t.float().pow(2).sum()) for t in ts)), rel=1e-5)
    if mode == "lora":
        assert dev[-1]["norm_lora_B"] > 0  # B starts at zero: six ZO steps moved it
    preds = read_jsonl(out / "test_predictions.jsonl")
    assert len(preds) == 16 and all(len(row["candidate_logprobs"]) == 2 for row in preds)
    assert sum(row["prediction"] == row["answer"] for row in preds) / 16 == r["final_accuracy"]


def test_train_fallback_and_truncation(runs):
    """A family with no native code trains through transformers; over-long prompts are cut and counted."""
    out, p = runs("neox-lora")
    r = last_json(p)
    assert r["path"].startswith("transformers fallback") and "transformers fallback" in p.stderr
    assert r["steps"] == 6 and 0 <= r["final_accuracy"] <= 1
    assert len([row for row in read_jsonl(out / "metrics.jsonl") if "loss" in row]) == 6
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert "train: " in p.stderr and "prompts truncated from the left to 16 tokens" in p.stderr


def test_resume_is_exact(runs, models):
    """6 steps straight == 3 steps, then --resume to 6: the same adapter, bit for bit."""
    a, p = runs("opt-lora")
    assert p.returncode == 0, p.stderr
    b, p = runs("resume-b")
    assert last_json(p)["steps"] == 3
    p = zoft("train", "--model", models["opt"], *TRAIN, *MODES["lora"], "--steps", "6", "--resume",
             "--output-dir", b)
    r = last_json(p)
    assert "resumed from" in p.stderr and r["steps"] == 6
    steps = [row["step"] for row in read_jsonl(b / "metrics.jsonl") if "loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6]
    for name in ("adapter", "checkpoint"):
        ta, tb = (load_file(str(d / name / "adapter_model.safetensors")) for d in (a, b))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{name}/{k} differs after --resume"
    losses = lambda d: [row["loss"] for row in read_jsonl(d / "metrics.jsonl") if "loss" in row]
    assert losses(a) == losses(b)


# ---- eval ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter"])
def test_eval(runs, models, zoft_here, tmp_path, with_adapter):
    out, p = runs("opt-lora")
    assert p.returncode == 0, p.stderr
    preds = tmp_path / "preds.jsonl"
    adapter = ["--adapter", out / "adapter"] if with_adapter else []
    run = zoft if with_adapter else zoft_here  # one real process per command is enough
    r = last_json(run("eval", "--model", models["opt"], "--task", "rotten_tomatoes", "--n-test", "16",
                      "--device", "cpu", *adapter, "--output", preds))
    assert r["n"] == 16 and 0 <= r["accuracy"] <= 1
    rows = read_jsonl(preds)
    assert len(rows) == 16
    for row in rows:
        lp = row["candidate_logprobs"]
        assert len(lp) == 2 and all(isinstance(x, float) and x < 0 for x in lp)
        assert row["prediction"] in (0, 1) and row["answer"] in (0, 1)
    if with_adapter:  # the same fixed test set and weights as the run's own final evaluation
        ref = read_jsonl(out / "test_predictions.jsonl")
        assert r["accuracy"] == last_json(p)["final_accuracy"]
        for row, want in zip(rows, ref, strict=True):
            assert row["answer"] == want["answer"]
            assert row["candidate_logprobs"] == pytest.approx(want["candidate_logprobs"], abs=1e-4)


# ---- export --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_export_merged_lora_matches_peft(runs, models, zoft_here, tmp_path, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, p = runs(f"{kind}-lora")
    assert p.returncode == 0, p.stderr
    merged_dir = tmp_path / "merged"
    run = zoft if kind == "opt" else zoft_here  # one real process per command is enough
    r = last_json(run("export", out, "--merge", "--output-dir", merged_dir))
    assert r["output_dir"] == str(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(models[kind]).eval()
    base_logits = hf_logits(base, IDS)
    peft_logits = hf_logits(PeftModel.from_pretrained(base, str(out / "adapter")).eval(), IDS)
    assert (peft_logits - base_logits).abs().max() > 1e-3, "adapter too small for this test to mean anything"
    torch.testing.assert_close(hf_logits(merged, IDS), peft_logits, atol=1e-4, rtol=0)


def test_export_full(runs, models, zoft_here, tmp_path):
    from transformers import AutoModelForCausalLM

    out, p = runs("opt-full")
    assert p.returncode == 0, p.stderr
    assert last_json(zoft_here("export", out, "--output-dir", tmp_path / "m"))
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    base = AutoModelForCausalLM.from_pretrained(models["opt"]).state_dict()
    trained_ = load_file(str(out / "best" / "trained.safetensors"))  # export takes the best dev checkpoint
    assert trained_ and all(k.startswith(("model.decoder.layers.1.", "model.decoder.layers.2."))
                            for k in trained_)
    for k, t in sd.items():
        torch.testing.assert_close(t, trained_.get(k, base[k]), atol=0, rtol=0, msg=k)


# ---- errors the user can fix: exit 2, one line, no traceback -------------------------------------


def test_missing_model_path(tmp_path):
    assert_user_error(zoft("train", "--model", tmp_path / "nope", "--output-dir", tmp_path / "o"), "nope")


def test_unknown_model_type_native(zoft_here, tmp_path):
    folder = tmp_path / "weird"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "weirdformer"}))
    p = zoft_here("train", "--model", folder, "--engine", "native", *DATA, "--output-dir", tmp_path / "o")
    assert_user_error(p, "weirdformer")


def write_task(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


ROW = {"question": "Is the sky blue?", "input": "Q", "candidates": [" no", " yes"], "answer": 1}


def test_malformed_jsonl(models, tmp_path):
    cut_short = '{"input": "x", "candidates": [" a", " b"], "answer": 0'
    task = write_task(tmp_path / "bad.jsonl", [ROW, ROW, cut_short])
    p = zoft("train", "--model", models["opt"], "--task", task, "--device", "cpu",
             "--output-dir", tmp_path / "o")
    assert_user_error(p, "bad.jsonl:3", "invalid JSON")


def test_template_field_missing(zoft_here, models, tmp_path):
    task = write_task(tmp_path / "t.jsonl", [ROW, {k: v for k, v in ROW.items() if k != "question"}])
    p = zoft_here("train", "--model", models["opt"], "--task", task, "--template", "{question} X",
                  "--device", "cpu", "--output-dir", tmp_path / "o")
    assert_user_error(p, "t.jsonl:2", "question")


def test_empty_candidate(zoft_here, models, tmp_path):
    task = write_task(tmp_path / "e.jsonl", [ROW, ROW | {"candidates": ["", " yes"]}])
    p = zoft_here("train", "--model", models["opt"], "--task", task, "--device", "cpu",
                  "--output-dir", tmp_path / "o")
    assert_user_error(p, "e.jsonl:2", "candidates")


def test_existing_checkpoint_needs_resume(zoft_here, tmp_path):
    (tmp_path / "o" / "checkpoint").mkdir(parents=True)
    (tmp_path / "o" / "checkpoint" / "state.json").write_text('{"next_step": 3, "applied": 3}')
    p = zoft_here("train", "--model", tmp_path / "not-even-loaded", "--output-dir", tmp_path / "o")
    assert_user_error(p, "already holds a zoft run", "--resume", "--overwrite-output-dir")


def test_resume_without_checkpoint(zoft_here, tmp_path):
    p = zoft_here("train", "--model", tmp_path / "not-even-loaded", "--resume",
                  "--output-dir", tmp_path / "o")
    assert_user_error(p, "--resume", "no run to continue")


@pytest.mark.parametrize("flags,needle", [(["--layers", "99"], "--layers"),
                                          (["--lora-targets", "nonexistent"], "nonexistent"),
                                          (["--max-length", "8", "--truncation", "error"], "--max-length 8")],
                         ids=["layers", "lora-targets", "truncation-error"])
def test_bad_flags(zoft_here, models, tmp_path, flags, needle):
    p = zoft_here("train", "--model", models["opt"], *DATA, *flags, "--steps", "1",
                  "--output-dir", tmp_path / "o")
    assert_user_error(p, needle)


@pytest.fixture(scope="module")
def diverged(runs):
    return runs("diverged")


def test_non_finite_loss_stops_with_finite_checkpoint(diverged):
    out, p = diverged
    msg = assert_user_error(p, "non-finite", str(out / "checkpoint"), "--resume", line_start=False)
    assert "strike" in msg
    tensors = load_file(str(out / "checkpoint" / "trained.safetensors"))
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    log = (out / "steps.jsonl").read_text().splitlines()
    reverts = [json.loads(line) for line in log if "revert_to" in line]
    assert len(reverts) >= 1 and all(r["reason"] == "non-finite loss" for r in reverts)


# Guard edge cases (once known bugs, fixed in the train loop/evaluate.py).


def test_non_finite_error_starts_its_own_line(diverged):
    assert_user_error(diverged[1], "non-finite")


def test_non_finite_checkpoint_holds_last_good_parameters(diverged):
    out, _ = diverged
    tensors = load_file(str(out / "checkpoint" / "trained.safetensors"))
    assert max(t.abs().max().item() for t in tensors.values()) < 1e3  # the tiny model's weights are O(1)


def test_diverging_last_update_is_not_a_success(zoft_here, models, tmp_path):
    out = tmp_path / "o"
    p = zoft_here("train", "--model", models["opt"], *DATA, "--mode", "full", "--lr", "1e30", "--steps", "1",
                  "--output-dir", out)
    if p.returncode == 0:
        rows = read_jsonl(out / "test_predictions.jsonl")
        assert all(math.isfinite(x) for row in rows for x in row["candidate_logprobs"])
    else:
        assert_user_error(p, "non-finite", line_start=False)


# ---- --attention ---------------------------------------------------------------------------------


def test_attention_varlen_on_cpu_trains_like_the_mask(models, zoft_here, tmp_path):
    """--attention varlen runs the variable-length plan (on a CPU through the reference loop): the same
    losses and projected gradients as the block-diagonal mask, and `zoft train` says which it used."""
    logs = {}
    for how in ("mask", "varlen"):
        out = tmp_path / how
        p = zoft_here("train", "--model", models["llama"], *DATA, *MODES["lora"], "--steps", "3", "--attention", how,
                      "--no-zero-shot", "--output-dir", out)
        assert p.returncode == 0, p.stderr
        assert ("attention: varlen sequences" in p.stderr) == (how == "varlen"), p.stderr
        assert ("block-diagonal SDPA mask" in p.stderr) == (how == "mask"), p.stderr
        logs[how] = [r for r in read_jsonl(out / "steps.jsonl") if "grads" in r]
    assert len(logs["mask"]) == 3
    for a, b in zip(logs["mask"], logs["varlen"], strict=True):
        assert a["grads"][0] != 0.0
        assert math.isclose(a["grads"][0], b["grads"][0], rel_tol=1e-3, abs_tol=1e-5), (a, b)
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5), (a, b)


def test_attention_varlen_errors(models, zoft_here, tmp_path):
    p = zoft_here("train", "--model", models["neox"], *DATA, "--attention", "varlen", "--steps", "1",
                  "--output-dir", tmp_path / "a")
    assert_user_error(p, "--attention varlen", "native")
    p = zoft_here("train", "--model", models["opt"], *DATA, "--attention", "varlen", "--optimizer", "adamw",
                  "--steps", "1", "--output-dir", tmp_path / "b")
    assert_user_error(p, "--attention varlen", "adamw")
    assert not (tmp_path / "b").exists()  # refused before anything was written
