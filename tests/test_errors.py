"""Bad inputs end in one `zoft: error:` line and exit status 2, never a traceback (issue 20, item 5).

Each case is one a user met: damaged model files, a non-GGUF .gguf, damaged checkpoints and step logs,
output paths zoft cannot write, a disk that fills up, a template that would allocate terabytes, lone
surrogates in the data, non-finite numbers. `zoft.cli.main` runs in this process; an exception it lets
out fails the test with its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import shutil
from pathlib import Path

import pytest

from tests.tiny import make_tiny
from zoft.cli import main as zoft_main
from zoft.errors import ZoftError
from zoft.files import describe_os_error, os_error_of
from zoft.train import steplog

DATA = ["--task", "rotten_tomatoes", "--n-train", "8", "--n-dev", "0", "--n-test", "4", "--batch-size", "4",
        "--device", "cpu", "--no-zero-shot"]


def zoft(*args) -> tuple[int, str]:
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            zoft_main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def user_error(result: tuple[int, str], *needles: str) -> str:
    code, err = result
    lines = [line[line.index("zoft: error: "):] for line in err.splitlines() if "zoft: error: " in line]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, f"exit {code}\n{err}"
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("errors")


@pytest.fixture(scope="module")
def model(root) -> str:
    return make_tiny("opt", str(root))


@pytest.fixture(scope="module")
def run(root, model) -> Path:
    """A finished 4-step LoRA run with checkpoints at 2 and 4."""
    out = root / "run"
    code, err = zoft("train", "--model", model, *DATA, "--steps", "4", "--save-every", "2", "--output-dir", out)
    assert code == 0, err
    return out


# ---- damaged model files -------------------------------------------------------------------------------

WEIGHTS = {"truncated": lambda b: b[: len(b) // 2], "empty": lambda b: b"", "garbage": lambda b: b"\x07" * 999}


@pytest.mark.parametrize("damage", list(WEIGHTS))
def test_damaged_model_weights(root, model, damage):
    m = root / f"model-{damage}"
    shutil.copytree(model, m)
    f = m / "model.safetensors"
    f.write_bytes(WEIGHTS[damage](f.read_bytes()))
    user_error(zoft("train", "--model", m, *DATA, "--steps", "1", "--output-dir", root / "o"),
               str(f), "not a readable safetensors file", "download or convert it again")
    assert not (root / "o").exists()


def test_model_config_not_json(root, model):
    m = root / "model-config"
    shutil.copytree(model, m)
    (m / "config.json").write_text("{model_type: opt")
    user_error(zoft("train", "--model", m, *DATA, "--output-dir", root / "o"), "config.json", "not valid JSON")


def test_not_a_gguf(root):
    g = root / "model.gguf"
    g.write_bytes(b"PK\x03\x04 a zip, renamed")
    user_error(zoft("eval", "--model", g, "--device", "cpu"), str(g), "not a GGUF file")


# ---- damaged checkpoints and step logs -------------------------------------------------------------------


def resume(model, out: Path) -> tuple[int, str]:
    return zoft("train", "--model", model, *DATA, "--steps", "6", "--save-every", "2", "--output-dir", out, "--resume")


STATES = {"missing": None, "malformed": "{next_step: 4", "a list": "[4, 4]",
          "without applied": json.dumps({"next_step": 4, "best_dev": -1.0})}


@pytest.mark.parametrize("state", list(STATES))
def test_damaged_checkpoint_state(root, model, run, state):
    out = root / f"state-{state.replace(' ', '-')}"
    shutil.copytree(run, out)
    f = out / "checkpoint" / "state.json"
    f.unlink() if STATES[state] is None else f.write_text(STATES[state])
    user_error(resume(model, out), str(f), "zoft replay")


@pytest.mark.parametrize("damage", list(WEIGHTS))
def test_damaged_adapter(root, model, run, damage):
    """eval --adapter reads the file itself (no checksum to compare with)."""
    out = root / f"adapter-{damage}"
    shutil.copytree(run / "adapter", out)
    f = out / "adapter_model.safetensors"
    f.write_bytes(WEIGHTS[damage](f.read_bytes()))
    user_error(zoft("eval", "--model", model, "--adapter", out, "--n-test", "4", "--device", "cpu"),
               str(f), "not a readable safetensors file")


def write_log(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(lines))
    return path


def test_step_log_reading(tmp_path):
    """Torn and NUL tails are dropped; anything else wrong is named with its line and the last good step."""
    rec = lambda step, **kw: json.dumps({"step": step, "seeds": [step], "grads": [0.5], "lr": 0.1} | kw).encode() + b"\n"
    head = [b'{"header": {"zo": {}}}\n', rec(0), rec(1)]
    header, records = steplog.read(str(write_log(tmp_path / "ok", head + [rec(2)[:9]])))
    assert header == {"zo": {}} and [r["step"] for r in records] == [0, 1]
    assert [r["step"] for r in steplog.read(str(write_log(tmp_path / "nul", head + [b"\0" * 300])))[1]] == [0, 1]
    nul_eaten = head + [rec(2)[:-1] + b"\0" * 50]  # its newline never reached the disk: the record is dropped
    assert [r["step"] for r in steplog.read(str(write_log(tmp_path / "nul2", nul_eaten)))[1]] == [0, 1]
    bad = {"garbage": [b"][ not json\n"], "nul-line": [b"\0\0\0\n"], "no-grads": [rec(2).replace(b'"grads"', b'"g"')],
           "nan": [rec(2, grads=[float("nan")])], "lr-inf": [rec(2, lr=float("inf"))], "step-back": [rec(1)],
           "second-header": [head[0]], "revert-beyond": [json.dumps({"step": 2, "revert_to": 9}).encode() + b"\n"]}
    for name, lines in bad.items():
        with pytest.raises(ZoftError, match=r"damaged at line 4 of 5: .*last good record is step 1.*head -n 3"):
            steplog.read(str(write_log(tmp_path / name, head + lines + [rec(3)])))


def test_step_log_tail_is_truncated_before_appending(tmp_path):
    log = write_log(tmp_path / "steps.jsonl", [b'{"header": {}}\n', b'{"step": 0, "see', b"\0" * 100])
    steplog.StepLog(str(log), None, fresh=False).close()
    assert log.read_bytes() == b'{"header": {}}\n'


# ---- where zoft writes -------------------------------------------------------------------------------------


def test_output_paths(root, model, run):
    afile = root / "afile"
    afile.write_text("x")
    train = ["train", "--model", model, *DATA, "--steps", "1"]
    user_error(zoft(*train, "--output-dir", afile), "is a file")
    user_error(zoft(*train, "--output-dir", afile / "sub"), f"{afile} is a file")
    user_error(zoft(*train, "--output-dir", ""), "--output-dir is empty")
    user_error(zoft("export", run, "--output-dir", afile), "is a file")
    user_error(zoft("replay", "--model", model, "--log", run / "steps.jsonl", "--output-dir", ""), "is empty")
    user_error(zoft("plot", run, "--output", root / "nodir" / "x.png"), "does not exist")
    user_error(zoft("eval", "--model", model, "--output", root / "nodir" / "p.jsonl"), "does not exist")
    assert afile.read_text() == "x"


def test_environment_errors_are_recognised():
    """Disk full inside safetensors' Rust writer arrives as a SafetensorError; a bug's OSError does not count."""
    from safetensors import SafetensorError

    e = os_error_of(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert e is not None and e.errno == errno.ENOSPC
    assert "No space left on device (ENOSPC)" in describe_os_error(OSError(errno.ENOSPC, "No space left on device", "f"))
    assert os_error_of(OSError(errno.EROFS, "Read-only file system")) is not None
    assert os_error_of(FileNotFoundError(errno.ENOENT, "No such file")) is None
    assert os_error_of(ValueError("os error 28")) is None


# ---- values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,needle", [
    (["--lr", "nan"], "--lr must be a finite number"), (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "-1"], "must be positive"), (["--eps", "nan"], "--eps must be a finite number"),
    (["--eps=-inf"], "--eps must be a finite number"), (["--weight-decay", "nan"], "--weight-decay"),
    (["--guard-threshold", "0.5"], "--guard-threshold must be above 1"), (["--guard-lr-factor", "2"], "(0, 1]"),
    (["--lora-alpha", "0"], "--lora-alpha"), (["--warmup", "-3"], "--warmup"),
    (["--template", "{text:999999999999}"], "is over 1000"), (["--template", "{text:>{width}}"], "nested"),
    (["--template", "{text"], "not a format string"), (["--template", "{text} \udcff"], "not valid Unicode"),
])
def test_bad_values(tmp_path, flags, needle):
    """Refused by the config's checks, before the model is even looked for."""
    user_error(zoft("train", "--model", tmp_path / "none", *flags, "--output-dir", tmp_path / "o"), needle)
    assert not (tmp_path / "o").exists()


def test_lr_and_eps_zero_mean_the_default(root, model):
    out = root / "zero"
    code, err = zoft("train", "--model", model, *DATA, "--steps", "1", "--lr", "0", "--eps", "0", "--output-dir", out)
    assert code == 0, err
    assert "ε=0.01, lr=0.0001" in err


@pytest.mark.parametrize("where", ["input", "candidate"])
def test_lone_surrogate_in_the_data(root, model, where):
    row = {"input": "fine", "candidates": [" a", " b"], "answer": 0}
    row["input" if where == "input" else "candidates"] = "x \ud800" if where == "input" else [" a\udcff", " b"]
    task = root / f"surrogate-{where}.jsonl"
    task.write_text("\n".join([json.dumps({**row, "answer": 1})] * 2 + [json.dumps(row)] * 2) + "\n")
    user_error(zoft("train", "--model", model, "--task", task, "--device", "cpu", "--output-dir", root / "o"),
               f"{task}:1", "lone surrogate")


def test_surrogate_reaching_the_tokenizer_from_a_builtin_task():
    from tests.helpers_tok import gpt2_tokenizer
    from zoft.tasks import Example, encode

    with pytest.raises(ZoftError, match="example 1: .*lone surrogate"):
        encode(gpt2_tokenizer(), [Example("ok", [" a"], 0), Example("bad \udc80", [" a"], 0)], None)


def test_damaged_adapter_config_and_metrics(root, model, run):
    out = root / "adapter-config"
    shutil.copytree(run / "adapter", out)
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    user_error(zoft("eval", "--model", model, "--adapter", out, "--device", "cpu"), "adapter_config.json", "'r'")
    plotted = root / "plotted"
    shutil.copytree(run, plotted)
    with open(plotted / "metrics.jsonl", "a") as f:
        f.write("garbage\n{}\n")
    user_error(zoft("plot", plotted, "--output", root / "x.png"), "metrics.jsonl:")


# ---- --master-dtype the device cannot compute in ------------------------------------------------------


def test_dtype_probe_fails_for_real_where_the_device_lacks_the_dtype():
    """session.dtype_fails tries on the device what full mode does with its trained weights (a GEMM, a
    residual add, a norm, a float32 z added to a copy). The CPU does all of them in the --master-dtype
    choices; float8 (GEMMs only) and complex (no norm) fail for real, the meta device computes nothing."""
    import torch

    from zoft.session import MASTER_DTYPES, dtype_fails

    assert all(dtype_fails("cpu", d) is None for d in MASTER_DTYPES.values())
    assert "not implemented for 'Float8_e4m3fn'" in dtype_fails("cpu", torch.float8_e4m3fn)
    assert "not implemented for 'ComplexFloat'" in dtype_fails("cpu", torch.complex64)
    assert "meta" in dtype_fails("meta", torch.float32)


def test_master_dtype_the_device_lacks_is_one_error_line(root, model, monkeypatch):
    """`--master-dtype` naming a dtype the device cannot compute in is one zoft: error line before anything
    is written. The CPU computes in every choice, so the name float16 is pointed at float8_e4m3fn here,
    which the CPU really lacks (its add is not implemented): the probe and the error path run unmocked."""
    import torch

    from zoft import session

    monkeypatch.setitem(session.MASTER_DTYPES, "float16", torch.float8_e4m3fn)
    out = root / "master-lacking"
    line = user_error(zoft("train", "--model", model, *DATA, "--steps", "1", "--mode", "full", "--layers", "1",
                           "--master-dtype", "float16", "--output-dir", out),
                      "--master-dtype float16: cpu cannot train in float16", "Float8_e4m3fn", "--master-dtype auto")
    assert "add_stub" in line
    assert not out.exists()


def test_half_master_with_the_inplace_step_is_one_error_line(root, model):
    """The in-place passes would round a half-precision master three times a step: refused, with the way out."""
    user_error(zoft("train", "--model", model, *DATA, "--steps", "1", "--mode", "full", "--engine", "hf",
                    "--master-dtype", "bfloat16", "--output-dir", root / "master-inplace"),
               "--master-dtype bfloat16 with --full-step inplace", "--full-step rows")


def test_float64_master_takes_the_torch_z():
    """Triton's kernels update float32/bf16/fp16 weights: a float64 master gets torch's z under auto, and an
    explicit --z-backend triton is refused (on CUDA; elsewhere triton is refused for the device first)."""
    from zoft.session import resolve_z_backend

    assert resolve_z_backend("auto", "cuda", wide=True) == "torch"
    with pytest.raises(ZoftError, match="--master-dtype float64"):
        resolve_z_backend("triton", "cuda", wide=True)
