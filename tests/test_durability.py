"""Crash safety and exactness of `zoft train`: SIGKILL at chosen points, SIGTERM/SIGINT, replay, the guard.

The runs that get killed are real `python -m zoft` processes started through a small driver that
appends a mark ("forward 2", "update 5", "tensors 9", "swap 6") as it enters each phase and holds
still at the one named by $ZOFT_TEST_STOP, so every kill lands in a known window instead of wherever
a timer happened to fire; the driver changes no arithmetic. The uninterrupted reference runs, the
resumes and the replays run in this process through `zoft.cli.main` (no import cost), with one
thread like the subprocesses; `test_determinism` checks that in-process and subprocess runs agree.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import make_tiny
from zoft.cli import main as zoft_main
from zoft.train import steplog

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                    "TOKENIZERS_PARALLELISM": "false"}
DATA = ["--task", "rotten_tomatoes", "--n-train", "32", "--n-dev", "8", "--n-test", "8", "--batch-size", "4",
        "--device", "cpu", "--no-zero-shot"]
RUN = DATA + ["--steps", "12", "--save-every", "3"]
MODES = {"lora": ["--lr", "0.05"], "full": ["--mode", "full", "--layers", "1-2", "--lr", "1e-3"],
         # every parameter in bf16, the only copy, stochastically rounded updates (θ never perturbed in place)
         "full-bf16": ["--mode", "full", "--dtype", "bfloat16", "--lr", "1e-3"]}
TIMEOUT = 120

# ---- helpers ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def zoft(*args) -> tuple[int, str, str]:
    """`zoft ARGS` in this process: (exit status, stderr, stdout)."""
    err, out, code = io.StringIO(), io.StringIO(), 0
    with one_thread(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            zoft_main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue(), out.getvalue()


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_file(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs: {a} vs {b}"
    assert a.read_bytes() == b.read_bytes(), f"{a} and {b} hold equal tensors but differ in bytes"


def result_file(run: Path, mode: str) -> Path:
    """What a finished run leaves: the PEFT adapter (LoRA) or the trained blocks (full)."""
    return run / "adapter" / "adapter_model.safetensors" if mode == "lora" else run / "checkpoint" / "trained.safetensors"


def updates(run: Path) -> list[tuple]:
    """The logged updates the parameters hold, as (step, seeds, grads, lr)."""
    from zoft.train import steplog

    _, records = steplog.read(str(run / "steps.jsonl"))
    return [(r["step"], r["seeds"], r["grads"], r["lr"]) for r in steplog.effective(records)]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in tensors(path).values())


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("durability")


@pytest.fixture(scope="module")
def model(root) -> str:
    return make_tiny("opt", str(root))


@pytest.fixture(scope="module")
def ref(root, model):
    """ref(mode) -> the folder of an uninterrupted 12-step run (once per mode)."""
    done = {}

    def get(mode: str) -> Path:
        if mode not in done:
            out = root / f"ref-{mode}"
            code, err, _ = zoft("train", "--model", model, *RUN, *MODES[mode], "--output-dir", out)
            assert code == 0, err
            done[mode] = out
        return done[mode]

    return get


# ---- runs that get interrupted ---------------------------------------------------------------------


def start_marked(args: list, out: Path, stop: str) -> int:
    """Fork this process (torch and zoft already imported, so no start-up cost) into `zoft ARGS`, which
    appends a mark to OUT.marks as it enters each phase and holds still at the mark `stop`:
      "forward k"  step k's forward passes are about to run
      "update k"   step k's record is in the step log, its update not yet applied
      "tensors k"  the checkpoint of step k has its tensors written to checkpoint.tmp, no state.json yet
                   ("tensors final": the final adapter's tensors are written)
      "swap k"     the old checkpoint is moved to checkpoint.old, checkpoint.tmp not yet in its place
      "cleanup k"  the new checkpoint is in place, checkpoint.old (whole) not yet removed
    The marks wrap zoft's functions without touching their arithmetic. Returns the child's pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        import zoft.train.checkpoint as C
        import zoft.train.loop as T

        marks = Path(str(out) + ".marks")
        count, saving = {"forward": 0, "update": 0}, [None]

        def signalled() -> bool:  # zoft's SIGINT/SIGTERM handler is a bound method of the flag's holder
            return getattr(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), "got", None) is not None

        def mark(label: str) -> None:
            with open(marks, "a") as f:
                f.write(label + "\n")
            end = time.time() + TIMEOUT
            while label == stop and time.time() < end and not signalled():
                time.sleep(0.01)

        def counted(phase, fn):
            def f(*a, **k):
                mark(f"{phase} {count[phase]}")
                count[phase] += 1
                return fn(*a, **k)
            return f

        def checkpoint(fn):
            def f(s, path, state, *a):
                saving[0] = state.get("next_step", "best")
                try:
                    return fn(s, path, state, *a)
                finally:
                    saving[0] = None
            return f

        def tensors_written(fn):
            def f(*a, **k):
                fn(*a, **k)
                mark(f"tensors {'final' if saving[0] is None else saving[0]}")
            return f

        real_replace, real_rmtree = os.replace, shutil.rmtree

        def replace(src, dst):
            real_replace(src, dst)
            if str(dst).endswith(os.sep + "checkpoint.old"):
                mark(f"swap {saving[0]}")

        def rmtree(path, *a, **k):
            if str(path).endswith(os.sep + "checkpoint.old") and os.path.isdir(path):
                mark(f"cleanup {saving[0]}")
            return real_rmtree(path, *a, **k)

        T.step_losses = counted("forward", T.step_losses)
        T.sgd_update_ = counted("update", T.sgd_update_)
        T.save_checkpoint = checkpoint(T.save_checkpoint)
        C.save_peft = tensors_written(C.save_peft)
        C.save_file = tensors_written(C.save_file)
        os.replace, shutil.rmtree = replace, rmtree
        sys.stdout = sys.stderr = open(str(out) + ".stderr", "w", buffering=1)
        torch.set_num_threads(1)
        zoft_main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def interrupt(args: list, out: Path, stop: str, sig: signal.Signals) -> tuple[int, str]:
    """Run `zoft ARGS` until it reaches the mark `stop`, send it `sig` there; (exit status, its stderr).
    The exit status is negative for death by a signal, as in subprocess."""
    pid = start_marked(args, out, stop)
    marks, end = Path(str(out) + ".marks"), time.time() + TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:  # ended on its own, never reaching `stop`
            break
        if marks.exists() and stop in marks.read_text().splitlines():
            os.kill(pid, sig)
            _, status = os.waitpid(pid, 0)
            break
        if time.time() > end:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            pytest.fail(f"the run never reached {stop!r}")
        time.sleep(0.005)
    err = Path(str(out) + ".stderr")
    return os.waitstatus_to_exitcode(status), err.read_text() if err.exists() else ""


KILLS = [  # (mode, the mark where SIGKILL lands)
    ("lora", "forward 2"),  # the last checkpoint is step 0's; steps 0-1 are only in the log
    ("lora", "update 5"),  # step 5 logged, not applied: resume must apply it exactly once
    ("lora", "tensors 9"),  # a half-written checkpoint beside the last good one
    ("lora", "tensors final"),  # all 12 steps checkpointed, the final adapter half-written
    ("full", "update 7"),  # full parameters, update pending
    ("full-bf16", "update 7"),  # bf16 weights: the update's stochastic rounding is replayed bitwise
    ("lora", "swap 6"),  # between the checkpoint swap's two renames: resume puts checkpoint.old back
]


@pytest.mark.parametrize("mode,stop", KILLS)
def test_sigkill_then_resume_is_exact(root, model, ref, mode, stop):
    a = ref(mode)
    b = root / f"kill-{mode}-{stop.replace(' ', '')}"
    args = ["train", "--model", model, *RUN, *MODES[mode], "--output-dir", b]
    status, stderr = interrupt(args, b, stop, signal.SIGKILL)
    assert status == -signal.SIGKILL, stderr[-3000:]
    assert not (b / "results.json").exists()

    code, err, _ = zoft(*args, "--resume")
    assert code == 0, err
    assert "resumed from" in err
    assert_same_file(result_file(a, mode), result_file(b, mode))
    assert updates(a) == updates(b)

    r = root / f"replay-{b.name}"  # the killed run's log is whole: it alone rebuilds the same parameters
    code, err, _ = zoft("replay", "--model", model, "--log", b / "steps.jsonl", "--output-dir", r)
    assert code == 0, err
    assert_same_file(result_file(a, mode), r / result_file(a, mode).name)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_resumes(root, model, ref, sig):
    """The signal arrives mid-step (at "forward 4"): the step finishes, a checkpoint is written, the exit
    status is 128 + signal and stderr says how to resume; resuming finishes the same run."""
    a = ref("lora")
    b = root / f"signal-{sig.name}"
    args = ["train", "--model", model, *RUN, *MODES["lora"], "--output-dir", b]
    status, stderr = interrupt(args, b, "forward 4", sig)
    assert status == 128 + sig, stderr[-3000:]
    assert "Traceback" not in stderr
    msg = re.findall(rf"zoft: {sig.name} at step 5: .*", stderr)  # may follow the progress bar on its line
    assert len(msg) == 1 and "--resume" in msg[0] and str(b / "checkpoint") in msg[0], stderr[-3000:]
    state = json.loads((b / "checkpoint" / "state.json").read_text())
    assert state["next_step"] == 5 and state["applied"] == 5
    assert not (b / "adapter").exists()

    code, err, _ = zoft(*args, "--resume")
    assert code == 0, err
    assert_same_file(result_file(a, "lora"), result_file(b, "lora"))
    assert losses(a) == losses(b)


# ---- kills with dev evaluations and the divergence guard on ------------------------------------------

# batch 1 and a tight guard: spikes are rejected all along (some while a step is queued behind them), a dev
# evaluation every 5 steps picks best/, checkpoints every 7. Full mode: spikes from step 20 on.
BUSY = {
    "lora": [*DATA, "--batch-size", "1", "--steps", "40", "--save-every", "7", "--eval-every", "5", "--lr", "0.05",
             "--guard-threshold", "1.02", "--guard-strikes", "100"],
    "full": [*RUN, "--mode", "full", "--lr", "0.1", "--steps", "26", "--guard-strikes", "10", "--guard-threshold",
             "1.5", "--eval-every", "4"],
}
TIMED = {"seconds", "train_seconds", "step_seconds", "replayed"}


@pytest.fixture(scope="module")
def busy_ref(root, model):
    done = {}

    def get(mode: str) -> Path:
        if mode not in done:
            out = root / f"busy-ref-{mode}"
            code, err, _ = zoft("train", "--model", model, *BUSY[mode], "--output-dir", out)
            assert code == 0, err
            done[mode] = out
        return done[mode]

    return get


def flag_value(args: list, flag: str) -> str:
    return args[len(args) - 1 - args[::-1].index(flag) + 1]  # the last one given wins, as in argparse


def untimed_metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMED} for line in (run / "metrics.jsonl").open()]


def assert_same_run(a: Path, b: Path) -> None:
    """Everything a run leaves that does not measure time: the same bytes, the same rows."""
    for name in ("adapter/adapter_model.safetensors", "best/adapter_model.safetensors", "best/state.json",
                 "checkpoint/adapter_model.safetensors", "checkpoint/trained.safetensors", "checkpoint/state.json",
                 "checkpoint/undo.safetensors", "test_predictions.jsonl"):
        assert (a / name).exists() == (b / name).exists(), name
        if (a / name).exists():
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    records = [(r / "steps.jsonl").read_text().split("\n", 1)[1] for r in (a, b)]  # the header names the folder
    assert records[0] == records[1]
    assert untimed_metrics(a) == untimed_metrics(b)
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    for k in ("final_accuracy", "best_dev_accuracy", "zero_shot_accuracy"):
        assert ra[k] == rb[k], k


BUSY_KILLS = [  # (mode, where SIGKILL lands, whether a dev evaluation falls in the steps replayed from the log)
    ("lora", "forward 13", True),  # checkpoint 7; the evaluation at 10 (and maybe best/) only in the log
    ("lora", "forward 33", False),
    ("lora", "swap 14", True),  # checkpoint.old (7) whole, the new one (14) not in place
    ("lora", "cleanup 21", False),  # a non-empty checkpoint.old left beside the good checkpoint
    ("lora", "tensors 28", True),  # a half-written checkpoint.tmp; the guard's last revert saved step 23's
    ("full", "forward 17", True),  # full mode: checkpoint 15, the evaluation at 16 only in the log
    ("full", "forward 24", False),  # in the spikes (from step 20 on), each revert saved a checkpoint
]


@pytest.mark.parametrize("mode,stop,eval_replayed", BUSY_KILLS)
def test_sigkill_with_evals_and_guard_resumes_bitwise(root, model, busy_ref, mode, stop, eval_replayed):
    a = busy_ref(mode)
    b = root / f"busy-kill-{mode}-{stop.replace(' ', '')}"
    args = ["train", "--model", model, *BUSY[mode], "--output-dir", b]
    status, stderr = interrupt(args, b, stop, signal.SIGKILL)
    assert status == -signal.SIGKILL, stderr[-3000:]
    if stop.startswith("cleanup"):
        assert any((b / "checkpoint.old").iterdir()) and (b / "checkpoint" / "state.json").is_file()
    state = json.loads(((b / "checkpoint") if (b / "checkpoint").is_dir() else (b / "checkpoint.old")).joinpath(
        "state.json").read_text())
    logged = [r["step"] + 1 for r in steplog.read(str(b / "steps.jsonl"))[1] if "grads" in r]
    every = int(flag_value(BUSY[mode], "--eval-every"))
    replayed = [k for k in logged if state["next_step"] < k and k % every == 0]
    assert bool(replayed) == eval_replayed, (state["next_step"], logged[-1], replayed)

    code, err, _ = zoft(*args, "--resume")
    assert code == 0, err
    assert_same_run(a, b)
    assert json.loads((b / "checkpoint" / "state.json").read_text())["next_step"] == int(
        flag_value(BUSY[mode], "--steps"))  # every later save succeeded
    assert not [p.name for p in b.iterdir() if p.name.endswith((".old", ".tmp")) or p.name == "zoft.lock"]


def test_sigterm_with_the_guard_resumes_bitwise(root, model, busy_ref):
    """SIGTERM saves a checkpoint mid-run: the guard's window, strikes and undo copy go with it."""
    a = busy_ref("lora")
    b = root / "busy-term"
    args = ["train", "--model", model, *BUSY["lora"], "--output-dir", b]
    status, stderr = interrupt(args, b, "forward 30", signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, stderr[-3000:]
    state = json.loads((b / "checkpoint" / "state.json").read_text())
    assert len(state["guard"]["recent"]) >= 10 and state["guard"]["strikes"] >= 1
    code, err, _ = zoft(*args, "--resume")
    assert code == 0, err
    assert_same_run(a, b)


def test_a_deleted_checkpoint_is_rebuilt_from_the_log(root, model, busy_ref):
    """No checkpoint, a whole log: --resume starts from the base weights and redoes every logged step."""
    a = busy_ref("lora")
    b = root / "busy-nockpt"
    args = ["train", "--model", model, *BUSY["lora"], "--output-dir", b]
    status, _ = interrupt(args, b, "forward 19", signal.SIGKILL)
    assert status == -signal.SIGKILL
    shutil.rmtree(b / "checkpoint")
    code, err, _ = zoft(*args, "--resume")
    assert code == 0, err
    assert "resumed from the base weights" in err
    assert_same_run(a, b)


@pytest.mark.parametrize("damage", ["deleted", "header only"])
def test_a_lost_step_log_is_named_as_such(root, model, busy_ref, damage):
    """An intact checkpoint whose log is gone or cut short: refused, blaming the log, not the guard."""
    b = root / f"busy-nolog-{damage.replace(' ', '')}"
    args = ["train", "--model", model, *BUSY["lora"], "--output-dir", b]
    interrupt(args, b, "forward 19", signal.SIGKILL)
    log = b / "steps.jsonl"
    if damage == "deleted":
        log.unlink()
    else:
        log.write_text(log.read_text().splitlines()[0] + "\n")
    before = {p: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    code, err, _ = zoft(*args, "--resume")
    assert code == 2, err
    line = [x for x in err.splitlines() if x.startswith("zoft: error: ")]
    assert len(line) == 1 and "deleted or cut short" in line[0] and "zoft export" in line[0], err[-2000:]
    assert "divergence" not in err and "Traceback" not in err
    assert {p: p.read_bytes() for p in b.rglob("*") if p.is_file()} == before


def test_sigkill_during_export_leaves_no_folder(root, model, busy_ref):
    """export builds its folder aside and renames it: a kill mid-write leaves nothing that loads."""
    a = busy_ref("lora")
    out = root / "exported"
    pid = os.fork()
    if pid == 0:  # the child stops for good once the merged weights are half written
        try:
            import zoft.export as E

            def save_file(tensors, path, **kw):
                Path(path).write_bytes(b"half")
                os.kill(os.getpid(), signal.SIGKILL)

            E.save_file = save_file
            zoft("export", a, "--merge", "--output-dir", out)
        finally:
            os._exit(70)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL
    assert not out.exists()
    code, err, _ = zoft("export", a, "--merge", "--output-dir", out)
    assert code == 0, err
    assert (out / "model.safetensors").stat().st_size > 1000
    assert not [p for p in root.iterdir() if p.name.startswith("exported.")]  # the half-written one is gone too


# ---- replay ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["lora", "full", "full-bf16"])
def test_replay_rebuilds_the_run(root, model, ref, mode):
    a = ref(mode)
    r = root / f"replay-{mode}"
    code, err, _ = zoft("replay", "--model", model, "--log", a / "steps.jsonl", "--output-dir", r)
    assert code == 0, err
    if mode == "lora":
        assert_same_file(a / "adapter" / "adapter_model.safetensors", r / "adapter_model.safetensors")
        assert json.loads((r / "adapter_config.json").read_text()) == json.loads(
            (a / "adapter" / "adapter_config.json").read_text())
    else:
        ta, tr = tensors(a / "checkpoint" / "trained.safetensors"), tensors(r / "trained.safetensors")
        assert ta.keys() == tr.keys() and all(torch.equal(ta[k], tr[k]) for k in ta)


def test_replay_checks_the_model_and_the_header(root, model, ref):
    """replay refuses another model's family or weights, a header from another run, and a log whose
    updates end in non-finite weights; it saves nothing in each case."""
    a = ref("lora")
    lines = (a / "steps.jsonl").read_text().splitlines()
    cases = {}
    cases["llama"] = (make_tiny("llama", str(root)), lines, "another model")
    cases["other weights"] = (make_tiny("opt", str(root / "seed1"), seed=1), lines, "another model")
    header = json.loads(lines[0])
    header["header"]["run"]["seed"] = 5
    cases["other header"] = (model, [json.dumps(header)] + lines[1:], "header comes from another run")
    inf = [json.loads(x) for x in lines]
    inf[3]["lr"] = float("inf")
    cases["lr inf"] = (model, [json.dumps(x) for x in inf], "damaged at line 4")  # steplog.read: 'lr' not finite
    huge = [json.loads(x) for x in lines]
    huge[0]["header"]["zo"]["lr"] = 1e30
    huge[3]["lr"], huge[3]["grads"] = 1e30, [1e30]
    cases["non-finite"] = (model, [json.dumps(x) for x in huge], "non-finite parameters")
    for name, (base, log_lines, needle) in cases.items():
        log = root / f"bad-{name.replace(' ', '-')}.jsonl"
        log.write_text("\n".join(log_lines) + "\n")
        out = root / f"bad-replay-{name.replace(' ', '-')}"
        code, err, _ = zoft("replay", "--model", base, "--log", log, "--output-dir", out)
        assert code == 2 and "Traceback" not in err, (name, err[-2000:])
        assert needle in err, (name, err[-2000:])
        assert not out.exists(), name


# ---- divergence guard ------------------------------------------------------------------------------

GUARD = {  # name: (flags, exit status, strikes); each run strikes the guard, then recovers (0) or stops (2)
    # LoRA with an lr that overflows the logits on the step after the first update: the guard undoes it
    # and stops (nothing left to undo), or, with the lr cut by 1e-12, goes on
    "lora-stops": (["--lr", "1e14"], 2, 4),  # lr × 0.5 per strike is not enough: the 4th of 3 strikes stops
    "lora-recovers": (["--lr", "1e12", "--guard-lr-factor", "1e-12"], 0, 1),
    # every parameter (blocks alone can't blow up the loss: the final LayerNorm bounds the logits), 26
    # steps: the running median needs 20 losses before a finite spike counts
    # (in place: rows train the same loss to rounding, which lr 0.1 amplifies into another trajectory). How many
    # spikes a recovering run meets is that trajectory's, and the CPU's kernels move it (6 on one VM, 5 on an
    # AMX one), so it is a range: at least two (the lr is halved and the run goes on), below the stop at 10
    "full-spike": (["--mode", "full", "--full-step", "inplace", "--lr", "0.1", "--steps", "26", "--guard-strikes",
                    "10"], 0, (2, 10)),
    "full-spike-stops": (["--mode", "full", "--full-step", "inplace", "--lr", "0.1", "--steps", "26"], 2, 4),
}


@pytest.fixture(scope="module")
def guarded(root, model):
    """guarded(name) -> (run folder, exit status, stderr + stdout) of the GUARD run, once each."""
    done = {}

    def get(name: str):
        if name not in done:
            out = root / f"guard-{name}"
            code, err, stdout = zoft("train", "--model", model, *RUN, *GUARD[name][0], "--guard-threshold", "1.5",
                                     "--output-dir", out)
            done[name] = out, code, err + stdout  # tqdm's bar.write() prints the strikes on stdout
        return done[name]

    return get


def saved_file(out: Path, name: str, code: int) -> Path:
    """What the run left to use: its adapter or trained blocks; after a stop, the checkpoint's."""
    lora = name.startswith("lora")
    if code == 2:
        return out / "checkpoint" / ("adapter_model.safetensors" if lora else "trained.safetensors")
    return out / "adapter" / "adapter_model.safetensors" if lora else out / "checkpoint" / "trained.safetensors"


@pytest.mark.parametrize("name", list(GUARD))
def test_guard(guarded, name):
    out, code, err = guarded(name)
    _, want_code, want = GUARD[name]
    assert code == want_code, err[-3000:]
    reverts = [r for r in map(json.loads, (out / "steps.jsonl").read_text().splitlines()) if "revert_to" in r]
    strikes = len(reverts)  # every strike undoes the update before it, the last one too
    lo, hi = want if isinstance(want, tuple) else (want, want)
    assert lo <= strikes <= hi, err[-3000:]
    assert len(re.findall(r"undid the last update", err)) == strikes - (code == 2)  # the last one stops instead
    if name.startswith("full"):
        assert all("running median" in r["reason"] for r in reverts)
    else:
        assert all(r["reason"] == "non-finite loss" for r in reverts)
    if code == 2:
        line = re.findall(r"zoft: error: .*", err)
        assert len(line) == 1 and str(out / "checkpoint") in line[0] and "--resume" in line[0], err[-3000:]
    for f in [saved_file(out, name, code), *(out / "checkpoint").glob("*.safetensors")]:
        assert all_finite(f), f


@pytest.mark.parametrize("name", GUARD)
def test_replay_after_guard(root, model, guarded, name):
    """Reverts are logged ({"revert_to": k}): the log alone still rebuilds what the run saved, bit for bit."""
    out, code, _ = guarded(name)
    saved = saved_file(out, name, code)
    r = root / f"replay-guard-{name}"
    rc, err, _ = zoft("replay", "--model", model, "--log", out / "steps.jsonl", "--output-dir", r)
    assert rc == 0, err
    rebuilt, want = tensors(r / saved.name), tensors(saved)
    assert rebuilt.keys() == want.keys()
    for k in want:
        assert torch.equal(rebuilt[k], want[k]), k


@pytest.mark.parametrize("name", ["lora-stops", "full-spike-stops"])
def test_guard_stop_then_resume_with_lower_lr_recovers(root, model, guarded, name):
    """The stop message's advice works: the checkpoint holds the parameters from before the bad update,
    so --resume with a lower --lr finishes the run."""
    src, code, _ = guarded(name)
    assert code == 2
    out = root / f"guard-resume-{name}"
    shutil.copytree(src, out)
    flags = list(GUARD[name][0])
    flags[flags.index("--lr") + 1] = "1e-4"
    code, err, _ = zoft("train", "--model", model, *RUN, *flags, "--guard-threshold", "1.5", "--output-dir", out,
                        "--resume")
    assert code == 0, err[-3000:]
    assert all_finite(saved_file(out, name, 0))


# ---- determinism -----------------------------------------------------------------------------------


def test_determinism(root, model, ref):
    """The same command twice, here and in a fresh `python -m zoft`: byte-identical adapter, same losses."""
    a = ref("lora")
    b = root / "again"
    p = subprocess.run([sys.executable, "-m", "zoft", "train", "--model", model, *RUN, *MODES["lora"],
                        "--output-dir", str(b)], capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert_same_file(a / "adapter" / "adapter_model.safetensors", b / "adapter" / "adapter_model.safetensors")
    assert losses(a) == losses(b) and len(losses(a)) == 12
    assert updates(a) == updates(b)


def test_a_fresh_start_replaces_a_stale_step_log(tmp_path):
    """A start killed before its first checkpoint leaves a log with no updates: the next fresh run replaces it
    (nothing is lost). A log that holds updates is a run: a fresh start refuses it, and only
    --overwrite-output-dir replaces it, never inheriting its records."""
    from zoft.config import ModelConfig, RunConfig, TaskConfig, TrainConfig, ZOConfig
    from zoft.errors import ZoftError
    from zoft.train.loop import train

    out = tmp_path / "run"
    out.mkdir()
    header = '{"header": {}}\n'
    cfg = TrainConfig(ModelConfig(model=make_tiny("opt", str(tmp_path))), TaskConfig(n_train=8, n_dev=0, n_test=0),
                      ZOConfig(batch_size=4), RunConfig(steps=2, output_dir=str(out), zero_shot=False))
    for stale, overwrite in ((header, False), (header + '{"step": 0, "seeds": [1], "grads": [9.0], "lr": 1.0, "loss": 1}\n', True)):
        (out / "steps.jsonl").write_text(stale)
        if overwrite:
            with pytest.raises(ZoftError, match="already holds a zoft run"):
                train(cfg)
            assert (out / "steps.jsonl").read_text() == stale
            cfg.run.overwrite_output_dir = True
        train(cfg)
        header_, records = steplog.read(str(out / "steps.jsonl"))
        assert header_ and header_["run"]["steps"] == 2
        assert [r["step"] for r in records] == [0, 1] and all(r["grads"] != [9.0] for r in records)


# ---- the pipelined loop ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_pipelined_lora_run_equals_a_synchronous_loop(root, model, device):
    """LoRA steps are pipelined (the update is queued with g on the device; the host reads step i's
    losses while step i+1 runs). Written out synchronously (read g, then update) from the run's own
    config, every step's g and the final parameters must be identical: each forward saw exactly the
    parameters of the updates before it. Two directions, clipping and weight decay all take part. On
    CUDA the losses travel through pinned memory and an event, and the blocks replay CUDA graphs."""
    from zoft.config import TrainConfig
    from zoft.session import attach, load_session, make_engine
    from zoft.train.data import batch_indices, load_data
    from zoft.train.step import step_losses
    from zoft.zo.trainable import direction_seeds
    from zoft.zo.update import lr_at, sgd_update_

    out = root / f"pipelined-{device}"
    run = [x if x != "cpu" else device for x in RUN]
    code, err, _ = zoft("train", "--model", model, *run, "--lr", "0.05", "--directions", "2", "--clip-grad", "0.05",
                        "--weight-decay", "0.1", "--schedule", "cosine", "--output-dir", out)
    assert code == 0, err
    cfg = TrainConfig.from_dict({k: v for k, v in json.loads((out / "zoft_config.json").read_text()).items()
                                 if k != "resolved"})
    rc, zc = cfg.run, cfg.zo
    with one_thread():
        s = load_session(cfg.model)
        attach(s, zc, rc.seed)
        eng = make_engine(s, rc.cache_mb, rc.pack_tokens, rc.cuda_graphs)
        enc, _, loss = load_data(cfg, s)
        want = []
        for step in range(rc.steps):
            idx = batch_indices(step, zc.batch_size, len(enc["train"]), rc.seed)
            seeds = direction_seeds(rc.seed, step, zc.directions)
            _, _, g = step_losses(eng, s, [enc["train"][i] for i in idx], loss, seeds, zc.eps_value)
            assert isinstance(g, list)  # synchronous: g read on the host before the update
            g = [min(max(x, -zc.clip_grad), zc.clip_grad) for x in g]
            want.append(g)
            sgd_update_(s.trainable, seeds, g, lr_at(step, rc.steps, zc.lr_value, zc.schedule, zc.warmup),
                        zc.weight_decay)
    got = [u[2] for u in updates(out)]
    assert got == want
    assert any(abs(x) == zc.clip_grad for g in got for x in g) and any(abs(x) < zc.clip_grad for g in got for x in g)
    saved = tensors(out / "checkpoint" / "adapter_model.safetensors")
    assert len(saved) == len(s.trainable.tensors)
    for name, t in zip(s.trainable.names, s.trainable.tensors):
        assert torch.equal(saved[f"base_model.model.{name}.weight"], t.detach().float().cpu()), name


def test_pipelined_and_synchronous_runs_agree_through_guard_rejections(root, model):
    """Batch size 1 and a tight guard: many spikes are rejected, some while a second step is queued
    behind them. The pipelined loop (undo from the copy before the last accepted update, re-run from
    the step after the rejected one) must log, revert and save exactly what --no-pipeline does."""
    args = [*DATA, "--batch-size", "1", "--steps", "40", "--save-every", "7", "--eval-every", "10", "--lr", "0.05",
            "--guard-threshold", "1.02", "--guard-strikes", "100"]
    runs = {}
    for flag in ("--pipeline", "--no-pipeline"):
        out = root / f"guard-agree{flag}"
        code, err, _ = zoft("train", "--model", model, *args, flag, "--output-dir", out)
        assert code == 0, err
        runs[flag] = out
    logs = {f: [line for line in (o / "steps.jsonl").read_text().splitlines() if '"header"' not in line]
            for f, o in runs.items()}
    assert logs["--pipeline"] == logs["--no-pipeline"]
    assert sum('"revert_to"' in line for line in logs["--pipeline"]) >= 3
    for name in ("adapter/adapter_model.safetensors", "checkpoint/adapter_model.safetensors", "checkpoint/state.json"):
        a, b = (runs[f] / name for f in ("--pipeline", "--no-pipeline"))
        assert a.read_bytes() == b.read_bytes(), name


def recording_updates(monkeypatch, into: list) -> None:
    """Record the type of g each update the loop makes is given (a device tensor when it is queued)."""
    import zoft.train.loop as T

    real = getattr(T.sgd_update_, "__wrapped__", T.sgd_update_)  # not an earlier recorder

    def update(tr, seeds, grads, *a):
        into.append(type(grads).__name__)
        return real(tr, seeds, grads, *a)

    update.__wrapped__ = real
    monkeypatch.setattr(T, "sgd_update_", update)


PIPELINED_FULL = {  # bf16 (the only copy, stochastically rounded), a float64 master, bf16 through guard rejections
    "bf16": [*RUN, *MODES["full-bf16"], "--directions", "3", "--weight-decay", "0.1"],
    "float64": [*RUN, *MODES["full"], "--master-dtype", "float64", "--directions", "3", "--weight-decay", "0.1"],
    "bf16-guard": [*BUSY["full"], "--dtype", "bfloat16", "--lr", "0.3"],
    # the trained blocks streamed from host memory: each update is written through to their host copies
    "bf16-offload": [*RUN, *MODES["full-bf16"], "--offload", "cpu", "--layers", "1-2", "--directions", "2"],
}


@pytest.mark.parametrize("case", PIPELINED_FULL)
def test_pipelined_full_run_equals_the_synchronous_one(root, model, monkeypatch, case):
    """Full mode's rows step is pipelined: each update is queued with g still a tensor, and the losses are
    read a step later. --no-pipeline's run (g read, then the update) must log, revert, evaluate and save the
    same bits, and `zoft replay` of the pipelined run's log must rebuild them. With the guard on, spikes
    are rejected while the next step's update is queued: the undo reloads the checkpoint and redoes the
    logged updates, the queued one dropped."""
    runs, kinds = {}, {}
    for flag in ("--pipeline", "--no-pipeline"):
        recording_updates(monkeypatch, kinds.setdefault(flag, []))
        runs[flag] = root / f"full-pipelined-{case}{flag}"
        code, err, _ = zoft("train", "--model", model, *PIPELINED_FULL[case], flag, "--output-dir", runs[flag])
        assert code == 0, err
    assert set(kinds["--pipeline"]) == {"Tensor"} and set(kinds["--no-pipeline"]) == {"list"}
    assert_same_run(runs["--pipeline"], runs["--no-pipeline"])
    header, records = steplog.read(str(runs["--pipeline"] / "steps.jsonl"))
    assert header["resolved"]["full_step"] == "rows"
    reverts = sum("revert_to" in r for r in records)
    assert reverts >= 2 if case.endswith("guard") else reverts == 0
    if reverts:  # some step's update was queued past a rejected step: the pipelined run made more updates
        assert len(kinds["--pipeline"]) > len(kinds["--no-pipeline"])
    r = root / f"full-pipelined-{case}-replay"
    code, err, _ = zoft("replay", "--model", model, "--log", runs["--pipeline"] / "steps.jsonl", "--output-dir", r)
    assert code == 0, err
    assert_same_file(result_file(runs["--pipeline"], "full"), r / "trained.safetensors")
    saved = tensors(r / "trained.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float64 if case == "float64" else torch.bfloat16}


@pytest.mark.parametrize("mode", ["lora", "full-bf16"])
def test_a_rejected_first_step_drops_the_update_queued_after_it(root, model, monkeypatch, mode):
    """Step 0's losses are not finite (NaN injected into its forward's result): nothing to undo, so the run
    stops with a checkpoint. Pipelined, step 1's update (finite g) is queued by the time step 0 is read:
    it must be dropped, and the stopped run leave what --no-pipeline's leaves."""
    import zoft.train.loop as T

    real, runs = T.step_losses, {}

    def losses(*a, **k):
        lp, lm, g = real(*a, **k)
        if not calls:
            lp, g = lp * float("nan"), g * float("nan") if torch.is_tensor(g) else [float("nan")] * len(g)
        calls.append(1)
        return lp, lm, g

    monkeypatch.setattr(T, "step_losses", losses)
    for flag in ("--pipeline", "--no-pipeline"):
        calls, kinds = [], []
        recording_updates(monkeypatch, kinds)
        runs[flag] = out = root / f"first-rejected-{mode}{flag}"
        code, err, _ = zoft("train", "--model", model, *RUN, *MODES[mode], flag, "--output-dir", out)
        assert code == 2 and "non-finite loss at step 1" in err, err[-2000:]
        assert kinds == (["Tensor", "Tensor"] if flag == "--pipeline" else []), kinds  # step 1's update was queued
    a, b = runs["--pipeline"] / "checkpoint", runs["--no-pipeline"] / "checkpoint"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def test_training_bar_is_quiet_in_a_log_file():
    """Off a terminal the bar refreshes every 30 s: 500 steps with a postfix each render a handful of times
    (at 0.1 s it was one line per step, megabytes for a 20k-step run)."""
    from zoft.session import progress

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        bar = progress(total=500, desc="train", file=sys.stderr)
        for i in range(500):
            time.sleep(0.002)  # a 1 s loop: tqdm's default 0.1 s interval would render ~10 times
            bar.update()
            bar.set_postfix(loss=f"{i}", refresh=False)
        bar.close()
    renders = err.getvalue().count("\r")
    assert renders <= 4, renders
    assert "500/500" in err.getvalue()
