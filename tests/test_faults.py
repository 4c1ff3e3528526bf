"""Fault injection: every disturbed run either ends with bitwise the adapter of an undisturbed run, or is
refused with one `zoft: error:` line and exit status 2, leaving its folder as it was. Never a traceback,
never a damaged folder.

Faults: real SIGKILLs at seeded random points (inside checkpoint saves, the step log's fsync, `zoft
export`), in LoRA and full mode with --eval-every and --guard-threshold on; torn, NUL-filled and garbage
step logs; damaged checkpoint tensors and state; a full disk (OSError(ENOSPC) injected at write, in
Python's files and in the safetensors writer); an unwritable output folder; two writers on one folder;
output folders that hold a model or other files; resumes with changed flags; a run folder moved away.

The disturbed runs are forks of this process (torch and zoft already imported) running `zoft.cli.main`.
A fork appends a mark to OUT.marks as it enters each phase ("forward 5", "state 6", "fsync 3", …) and
holds still at the one it is told to stop at, so each kill lands in a known window; the marks and the
injected disk errors wrap zoft's functions without touching their arithmetic. References and resumes run
in this process. The tally prints `N faults injected, N survived, 0 runs corrupted` at the end (visible
with `pytest -s`) and writes it to faults_summary.txt in pytest's base temp folder.

Run-folder ownership and lock, the resume config check, checkpoint .old recovery, guard state in
checkpoints, dev evaluations of replayed steps and atomic export come from the reliability branch
(zoft/train/rundir.py, zoft/train/resume.py).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tiny import make_tiny
from zoft.cli import main as zoft_main
from zoft.train import steplog

DATA = ["--task", "rotten_tomatoes", "--n-train", "32", "--n-dev", "8", "--n-test", "8", "--batch-size", "4",
        "--device", "cpu", "--no-zero-shot", "--fsync-every", "2"]
MODES = {"lora": ["--lr", "0.05"], "full": ["--mode", "full", "--layers", "1-2", "--lr", "1e-3"]}
PLAIN = DATA + ["--steps", "12", "--save-every", "3"]
# dev evaluations at the checkpoints only: a kill between two checkpoints loses no evaluation today
EVAL_GUARD = DATA + ["--steps", "16", "--save-every", "4", "--eval-every", "4", "--guard-threshold", "3"]
GUARDED = [*DATA[:8], "--batch-size", "1", *DATA[10:], "--steps", "40", "--save-every", "7", "--lr", "0.05",
           "--guard-threshold", "1.02", "--guard-strikes", "100"]  # many guard rejections (test_durability)
TIMEOUT = 120

rng = random.Random(20)  # the kill points: random, and the same every time
BETWEEN = {m: [f"{p} {rng.randrange(16)}" for p in ("forward", "update")] + [f"fsync {rng.randrange(2, 12)}"]
           for m in MODES}
DURING_SAVE = {m: [f"{p} {rng.choice([3, 6, 9, 12])}" for p in ("tensors", "state", "swap")] for m in MODES}


# ---- running zoft ------------------------------------------------------------------------------------


def zoft(*args) -> tuple[int, str]:
    """`zoft ARGS` in this process, one thread: (exit status, stderr + stdout). An exception zoft lets out
    is what a user would see as a traceback and exit status 1, and is reported so."""
    err, code = io.StringIO(), 0
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            zoft_main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    except Exception:  # noqa: BLE001 - any of them is a traceback to the user
        code = 1
        err.write(traceback.format_exc())
    finally:
        torch.set_num_threads(n)
    return code, err.getvalue()


def install_marks(mark) -> None:
    """In a fork: call mark(label) as zoft enters each phase (see the module docstring)."""
    import zoft.export as E
    import zoft.train.checkpoint as C
    import zoft.train.loop as T

    count, saving, fsyncs = {"forward": 0, "update": 0}, [None, False], [0]  # saving: (label, renamed yet)

    def counted(phase, fn):
        def f(*a, **k):
            mark(f"{phase} {count[phase]}")
            count[phase] += 1
            return fn(*a, **k)
        return f

    def checkpoint(fn):
        def f(s, path, state, *rest):  # rest: the guard's undo copy, saved beside the parameters
            saving[:] = state.get("next_step", "best"), False
            try:
                return fn(s, path, state, *rest)
            finally:
                saving[0] = None
        return f

    def then_mark(label, fn):
        def f(*a, **k):
            fn(*a, **k)
            mark(label() if callable(label) else label)
        return f

    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst):
        folder = saving[0] is not None and os.path.isdir(src)  # a checkpoint folder, not a file inside one
        if folder and not saving[1]:
            saving[1] = True
            mark(f"state {saving[0]}")  # the new checkpoint is whole in .tmp; nothing renamed yet
        real_replace(src, dst)
        if folder and str(dst).endswith(".old"):
            mark(f"swap {saving[0]}")  # the old checkpoint moved aside, the new one not yet in place
        elif folder and str(src).endswith(".tmp"):
            mark(f"swapped {saving[0]}")  # the new one in place, the old one not yet removed

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("steps.jsonl"):
            fsyncs[0] += 1
            mark(f"fsync {fsyncs[0]}")
        return real_fsync(fd)

    tensors = lambda: f"tensors {'final' if saving[0] is None else saving[0]}"
    T.step_losses, T.sgd_update_ = counted("forward", T.step_losses), counted("update", T.sgd_update_)
    T.save_checkpoint = checkpoint(T.save_checkpoint)
    C.save_peft, C.save_file = then_mark(tensors, C.save_peft), then_mark(tensors, C.save_file)
    E.save_file = then_mark("export tensors", E.save_file)
    os.replace, os.fsync = replace, fsync


class FullDisk:
    """A file under the run folder that fails with OSError(`err`) once the folder's byte budget is spent
    (the bytes that still fit are written first, as a real full disk does)."""

    def __init__(self, f, take, err: int):
        self.f, self.take, self.err = f, take, err

    def write(self, data):
        n = len(data.encode() if isinstance(data, str) else data)
        k = self.take(n)
        if k < n:
            self.f.write(data[:k] if isinstance(data, bytes) else data.encode()[:k].decode(errors="ignore"))
            self.f.flush()
            raise OSError(self.err, os.strerror(self.err), self.f.name)
        return self.f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def install_full_disk(root: Path, budget: float, err: int = errno.ENOSPC) -> list[int]:
    """In a fork: writes under `root` fail with `err` past `budget` bytes, through open() and the safetensors
    writer (which reports a failed write as SafetensorError "… (os error N)"); with EACCES, making folders
    there fails too. Returns the one-element list counting bytes written."""
    import safetensors.torch as st
    from safetensors import SafetensorError

    import zoft.export as E
    import zoft.train.checkpoint as C

    used, prefix = [0], str(root) + os.sep
    under = lambda p: isinstance(p, (str, os.PathLike)) and (os.path.abspath(p) + os.sep).startswith(prefix)

    def take(n: int) -> int:
        k = int(max(0, min(n, budget - used[0])))
        used[0] += k
        return k

    real_open, real_save, real_makedirs = builtins.open, st.save_file, os.makedirs

    def open_(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return FullDisk(f, take, err) if under(file) and any(c in mode for c in "wax+") else f

    def save_file(tensors, filename, metadata=None):
        data = st.save(tensors, metadata)
        if under(filename) and take(len(data)) < len(data):
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(err)} (os error {err})")
        return real_save(tensors, filename, metadata)

    def makedirs(name, *a, **k):
        if err == errno.EACCES and under(name):
            raise PermissionError(err, os.strerror(err), str(name))
        return real_makedirs(name, *a, **k)

    builtins.open, os.makedirs = open_, makedirs
    st.save_file = C.save_file = E.save_file = save_file
    return used


def spawn(args: list, out: Path, stop: str = "", disk: tuple | None = None) -> int:
    """Fork into `zoft ARGS` (output in OUT.stderr), holding at mark `stop` until OUT.release exists.
    disk=(budget, errno): install_full_disk on `out`. Returns the pid; the exit status is 1 for a traceback."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        marks, release = Path(f"{out}.marks"), Path(f"{out}.release")
        used = install_full_disk(out, *disk) if disk else [0]

        def mark(label: str) -> None:
            with open(marks, "a") as f:
                f.write(f"{label} @{used[0]}\n")
            end = time.time() + TIMEOUT
            while label == stop and not release.exists() and time.time() < end:
                time.sleep(0.01)

        install_marks(mark)
        sys.stdout = sys.stderr = open(f"{out}.stderr", "w", buffering=1)
        torch.set_num_threads(1)
        zoft_main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def marks_of(out: Path) -> list[str]:
    p = Path(f"{out}.marks")
    return [line.rsplit(" @", 1)[0] for line in p.read_text().splitlines()] if p.exists() else []


def wait(pid: int, out: Path, stop: str = "", sig: int = signal.SIGKILL) -> tuple[int, str]:
    """Wait for the fork; when it reaches `stop`, send `sig`. (exit status, its output); -N: killed by N."""
    end = time.time() + TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if stop and stop in marks_of(out):
            os.kill(pid, sig)
            if sig != signal.SIGKILL:
                Path(f"{out}.release").touch()  # let it see the signal between steps
            _, status = os.waitpid(pid, 0)
            break
        if time.time() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"{out.name}: never reached {stop!r}; marks: {marks_of(out)[-5:]}")
        time.sleep(0.005)
    err = Path(f"{out}.stderr")
    return os.waitstatus_to_exitcode(status), err.read_text() if err.exists() else ""


def interrupt(args: list, out: Path, stop: str, sig: int = signal.SIGKILL) -> tuple[int, str]:
    status, err = wait(spawn(args, out, stop), out, stop, sig)
    assert stop in marks_of(out), f"never reached {stop!r}: exit {status}\n{err[-2000:]}"
    return status, err


# ---- what counts as surviving ------------------------------------------------------------------------


class Tally:
    """Every injected fault and its verdict: survived (bitwise result, or a clean refusal) or corrupted."""

    def __init__(self):
        self.rows: list[tuple[str, bool]] = []  # (test id, survived)

    def line(self) -> str:
        n, ok = len(self.rows), sum(s for _, s in self.rows)
        return f"{n} faults injected, {ok} survived, {n - ok} runs corrupted"


@pytest.fixture(scope="session")
def tally(tmp_path_factory):
    t = Tally()
    yield t
    if t.rows:
        line = t.line()
        (tmp_path_factory.getbasetemp() / "faults_summary.txt").write_text(line + "\n")
        print(f"\n{line}")


@pytest.fixture
def verdict(tally, request):
    """verdict(ok, why): record this test's fault as survived or corrupted, then assert it survived."""

    def judge(ok: bool, why: str = "") -> None:
        tally.rows.append((request.node.name, bool(ok)))
        assert ok, why

    return judge


def refused(code: int, out: str) -> str | None:
    """The one `zoft: error:` message of a clean refusal (exit 2, no traceback), else None."""
    lines = [line[line.index("zoft: error: "):] for line in out.splitlines() if "zoft: error: " in line]
    return lines[0] if code == 2 and len(lines) == 1 and "Traceback" not in out else None


def snapshot(folder: Path, but: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file under `folder` (except those named in `but`) and a hash of its bytes: a refusal must leave
    it exactly so."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and str(p.relative_to(folder)) not in but}


# Files a refused resume may rewrite: none (every check runs before the first write, the config's included)
RUN_CONFIG: tuple[str, ...] = ()


def result_files(run: Path, mode: str) -> list[Path]:
    """What a finished run leaves to use: the adapter (the best dev step's, with --eval-every), or the trained
    blocks of the last step and of the best dev step."""
    if mode == "lora":
        return [run / "adapter" / "adapter_model.safetensors"]
    return [run / name / "trained.safetensors" for name in ("checkpoint", "best") if (run / name).is_dir()]


def updates(run: Path) -> list[tuple]:
    _, records = steplog.read(str(run / "steps.jsonl"))
    return [(r["step"], r["seeds"], r["grads"], r["lr"]) for r in steplog.effective(records)]


def same_run(a: Path, b: Path, mode: str) -> str:
    """'' when run b ended with bitwise a's result and a's updates, else what differs."""
    for fa in result_files(a, mode):
        fb = b / fa.relative_to(a)
        if not fb.is_file():
            return f"{fb} is missing"
        if fa.read_bytes() != fb.read_bytes():
            ta, tb = load_file(str(fa)), load_file(str(fb))
            worst = max((float((ta[k] - tb[k]).abs().max()) for k in ta if k in tb), default=float("nan"))
            return f"{fb.relative_to(b)} differs from the undisturbed run's (max |Δ| {worst:.3g})"
    try:
        if updates(a) != updates(b):
            return "the step logs hold different updates"
    except Exception as e:  # noqa: BLE001 - a log that does not read back is a damaged folder, whatever the cause
        return f"the step log does not read back: {e}"
    return ""


# ---- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def model(root) -> str:
    return make_tiny("opt", str(root))


@pytest.fixture(scope="module")
def ref(root, model):
    """ref(name, flags) -> the folder of an undisturbed run (once per name)."""
    done = {}

    def get(name: str, flags: list) -> Path:
        if name not in done:
            out = root / f"ref-{name}"
            code, err = zoft("train", "--model", model, *flags, "--output-dir", out)
            assert code == 0, err[-3000:]
            done[name] = out
        return done[name]

    return get


def killed_then_resumed(root, model, ref, verdict, name: str, flags: list, mode: str, stop: str,
                        sig: int = signal.SIGKILL) -> None:
    """The run with `flags`, killed at `stop`, resumed: the undisturbed run's result, bit for bit."""
    a = ref(name, flags)
    b = root / f"{name}-{stop.replace(' ', '')}-{signal.Signals(sig).name}"
    args = ["train", "--model", model, *flags, "--output-dir", b]
    status, err = interrupt(args, b, stop, sig)
    assert status in (-signal.SIGKILL, 128 + sig), err[-3000:]
    code, err = zoft(*args, "--resume")
    verdict(code == 0 and not same_run(a, b, mode), f"exit {code}: {same_run(a, b, mode)}\n{err[-3000:]}")


# ---- SIGKILL at random points ------------------------------------------------------------------------


@pytest.mark.parametrize("mode,stop", [(m, s) for m in MODES for s in BETWEEN[m]])
def test_sigkill_between_checkpoints(root, model, ref, verdict, mode, stop):
    """Forward passes, updates and the step log's fsync, with --eval-every and --guard-threshold on."""
    killed_then_resumed(root, model, ref, verdict, f"eval-guard-{mode}", EVAL_GUARD + MODES[mode], mode, stop)


@pytest.mark.parametrize("mode,stop", [(m, s) for m in MODES for s in DURING_SAVE[m]] + [("full", "state 12")])
def test_sigkill_during_checkpoint_save(root, model, ref, verdict, mode, stop):
    """Tensors written, state.json written, the old checkpoint moved aside (no dev evaluations). "state 12":
    every step is in the log, the final checkpoint is not; full mode's result is that checkpoint."""
    killed_then_resumed(root, model, ref, verdict, f"plain-{mode}", PLAIN + MODES[mode], mode, stop)


def test_sigkill_before_the_old_checkpoint_is_removed(root, model, ref, verdict):
    """The new checkpoint in place, checkpoint.old not yet removed: the next save must not trip over it."""
    killed_then_resumed(root, model, ref, verdict, "plain-lora", PLAIN + MODES["lora"], "lora", "swapped 6")


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_during_the_save_after_a_dev_evaluation(root, model, ref, verdict, mode):
    """The first dev evaluation done (best/ saved), its checkpoint not: the resumed run must count it."""
    killed_then_resumed(root, model, ref, verdict, f"eval-guard-{mode}", EVAL_GUARD + MODES[mode], mode, "state 4")


def test_sigkill_with_dev_evaluations_between_checkpoints(root, model, ref, verdict):
    """Evaluations at steps 2 and 4, checkpoints at 6: a kill at step 5 must not lose the evaluations."""
    flags = DATA + ["--steps", "12", "--eval-every", "2", "--save-every", "6", *MODES["lora"]]
    killed_then_resumed(root, model, ref, verdict, "eval-between", flags, "lora", "forward 5")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_stop_with_guard_state(root, model, ref, verdict, sig):
    """Many guard rejections: the resumed guard must hold the same window of losses and strikes."""
    killed_then_resumed(root, model, ref, verdict, "guarded", GUARDED, "lora", "forward 25", sig)


@pytest.fixture(scope="module")
def exported(root, model, ref):
    """An undisturbed `zoft export --merge` of the plain LoRA run."""
    out = root / "export-ref"
    code, err = zoft("export", ref("plain-lora", PLAIN + MODES["lora"]), "--merge", "--output-dir", out)
    assert code == 0, err
    return out


def test_sigkill_during_export(root, ref, exported, verdict):
    """Killed after writing the weights: no half folder that loads; running it again gives the same folder."""
    run = ref("plain-lora", PLAIN + MODES["lora"])
    out = root / "export-killed"
    status, err = interrupt(["export", run, "--merge", "--output-dir", out], out, "export tensors")
    assert status == -signal.SIGKILL, err[-3000:]
    half = out.exists() and snapshot(out) != snapshot(exported)
    code, err = zoft("export", run, "--merge", "--output-dir", out)
    verdict(not half and code == 0 and snapshot(out) == snapshot(exported),
            f"half-written folder left: {half}; rerun exit {code}\n{err[-2000:]}")


# ---- damaged step logs and checkpoints ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped(root, model):
    """stopped(mode) -> a run killed at step 8: checkpoint at step 6, steps 0-7 in the log (once per mode)."""
    done = {}

    def get(mode: str) -> Path:
        if mode not in done:
            out = root / f"stopped-{mode}"
            status, err = interrupt(["train", "--model", model, *PLAIN, *MODES[mode], "--output-dir", out], out,
                                    "forward 8")
            assert status == -signal.SIGKILL, err[-3000:]
            done[mode] = out
        return done[mode]

    return get


def damaged_copy(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    damage(dst)
    return dst


def log_lines(run: Path) -> list[bytes]:
    return (run / "steps.jsonl").read_bytes().splitlines(keepends=True)


def set_log(run: Path, lines: list[bytes]) -> None:
    (run / "steps.jsonl").write_bytes(b"".join(lines))


REPAIRED = {  # damage a crash leaves at the end of the log: dropped, and the lost steps recomputed
    "torn-last-line": lambda run: set_log(run, log_lines(run)[:-1] + [log_lines(run)[-1][:25]]),
    "nul-tail": lambda run: set_log(run, log_lines(run) + [b"\0" * 4096]),
    # the filesystem extended the file, the data never came: only what follows the last fsync (the checkpoint's)
    "nul-last-line": lambda run: set_log(run, log_lines(run)[:-1] + [b"\0" * len(log_lines(run)[-1])]),
}


@pytest.mark.parametrize("damage", list(REPAIRED))
def test_step_log_tail_is_repaired(root, model, ref, stopped, verdict, damage):
    b = damaged_copy(stopped("lora"), root / f"log-{damage}", REPAIRED[damage])
    code, err = zoft("train", "--model", model, *PLAIN, *MODES["lora"], "--output-dir", b, "--resume")
    a = ref("plain-lora", PLAIN + MODES["lora"])
    verdict(code == 0 and not same_run(a, b, "lora"), f"exit {code}: {same_run(a, b, 'lora')}\n{err[-3000:]}")


def record_at(run: Path, step: int) -> int:
    """Index in the log's lines of the record of `step` (-1: the last record)."""
    lines = log_lines(run)
    return len(lines) - 1 if step < 0 else next(i for i, x in enumerate(lines) if json.loads(x).get("step") == step)


def insert(run: Path, i: int, line: bytes) -> None:
    lines = log_lines(run)
    set_log(run, lines[:i] + [line] + lines[i:])


def drop_grads(run: Path) -> None:
    lines = log_lines(run)
    i = record_at(run, 3)
    r = json.loads(lines[i])
    del r["grads"]
    set_log(run, lines[:i] + [json.dumps(r).encode() + b"\n"] + lines[i + 1:])


REFUSED = {  # damage inside the log: named, with the last good step; never replayed around. The stopped
    # LoRA run's last record is step 6, the first after its checkpoint (pipelined: step 7 was never read)
    "garbage-line": lambda run: insert(run, record_at(run, -1), b"\x93garbage ][\n"),
    "nul-line": lambda run: insert(run, record_at(run, -1), b"\0" * 80 + b"\n"),
    "record-without-grads": drop_grads,
    "interleaved-writers": lambda run: insert(run, record_at(run, -1), log_lines(run)[record_at(run, 4)]),
}


@pytest.mark.parametrize("damage", list(REFUSED))
@pytest.mark.parametrize("command", ["resume", "replay"])
def test_damaged_step_log_is_refused(root, model, stopped, verdict, damage, command):
    b = damaged_copy(stopped("lora"), root / f"log-{damage}-{command}", REFUSED[damage])
    before = snapshot(b, RUN_CONFIG)
    if command == "resume":
        code, err = zoft("train", "--model", model, *PLAIN, *MODES["lora"], "--output-dir", b, "--resume")
    else:
        code, err = zoft("replay", "--model", model, "--log", b / "steps.jsonl", "--output-dir", root / f"r-{b.name}")
    msg = refused(code, err)
    verdict(msg is not None and "steps.jsonl" in msg and "last good" in msg and snapshot(b, RUN_CONFIG) == before,
            f"exit {code}, folder unchanged: {snapshot(b, RUN_CONFIG) == before}\n{err[-3000:]}")


def test_damaged_step_log_advice_works(root, model, ref, stopped, verdict):
    """Garbage after the checkpoint's step: keeping the lines before it, as the error says, and resuming
    recomputes the rest: the undisturbed run's adapter."""
    b = damaged_copy(stopped("lora"), root / "log-advice", REFUSED["garbage-line"])
    args = ["train", "--model", model, *PLAIN, *MODES["lora"], "--output-dir", b, "--resume"]
    msg = refused(*zoft(*args))
    assert msg, "not refused"
    keep = int(msg.split("keep its first ")[1].split()[0])
    set_log(b, log_lines(b)[:keep])
    code, err = zoft(*args)
    a = ref("plain-lora", PLAIN + MODES["lora"])
    verdict(code == 0 and not same_run(a, b, "lora"), f"exit {code}: {same_run(a, b, 'lora')}\n{err[-3000:]}")


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-9] ^= 0x40  # inside the last tensor's data: the header still parses
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def drop_state_key(path: Path) -> None:
    state = json.loads(path.read_text())
    del state["applied"]
    path.write_text(json.dumps(state))


CKPT = {"flipped-bit": flip_byte, "truncated": truncate}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("damage", [*CKPT, "state-without-applied"])
def test_damaged_checkpoint_is_refused(root, model, stopped, verdict, mode, damage):
    """Refused without writing; the zoft replay the error advises rebuilds the parameters from the log."""
    name = "adapter_model.safetensors" if mode == "lora" else "trained.safetensors"
    b = root / f"ckpt-{damage}-{mode}"
    shutil.copytree(stopped(mode), b)
    (CKPT[damage] if damage in CKPT else drop_state_key)(b / "checkpoint" / (name if damage in CKPT else "state.json"))
    before = snapshot(b, RUN_CONFIG)
    code, err = zoft("train", "--model", model, *PLAIN, *MODES[mode], "--output-dir", b, "--resume")
    msg = refused(code, err)
    ok = msg is not None and "zoft replay" in msg and snapshot(b, RUN_CONFIG) == before
    r = root / f"replay-{b.name}"
    rcode, rerr = zoft("replay", "--model", model, "--log", b / "steps.jsonl", "--output-dir", r)
    verdict(ok and rcode == 0 and (r / name).is_file(), f"exit {code}\n{err[-2000:]}\nreplay exit {rcode}\n{rerr[-2000:]}")


# ---- a full disk, an unwritable folder ---------------------------------------------------------------


@pytest.fixture(scope="module")
def disk_usage(root, model):
    """disk_usage(mode) -> (bytes written once the first checkpoint is in place, bytes a whole run writes)."""
    done = {}

    def get(mode: str) -> tuple[int, int]:
        if mode not in done:
            out = root / f"count-{mode}"
            status, err = wait(spawn(["train", "--model", model, *PLAIN, *MODES[mode], "--output-dir", out], out,
                                     disk=(float("inf"), errno.ENOSPC)), out)
            assert status == 0, err[-3000:]
            lines = Path(f"{out}.marks").read_text().splitlines()
            used = lambda line: int(line.rsplit("@", 1)[1])
            done[mode] = used(next(x for x in lines if x.startswith("forward 0"))), used(lines[-1])
        return done[mode]

    return get


@pytest.mark.parametrize("mode,i", [("lora", i) for i in range(4)] + [("full", i) for i in range(2)])
def test_disk_full(root, model, ref, disk_usage, verdict, mode, i):
    """ENOSPC at a seeded random byte after the first checkpoint: one error line that says --resume, and
    resuming once there is space again finishes the undisturbed run."""
    lo, hi = disk_usage(mode)
    budget = random.Random(f"{mode}{i}").randrange(lo, hi)
    b = root / f"enospc-{mode}-{i}"
    args = ["train", "--model", model, *PLAIN, *MODES[mode], "--output-dir", b]
    status, err = wait(spawn(args, b, disk=(budget, errno.ENOSPC)), b)
    msg = refused(status, err)
    assert msg and "No space left on device" in msg and "--resume" in msg, f"exit {status}\n{err[-3000:]}"
    code, err = zoft(*args, "--resume")
    a = ref(f"plain-{mode}", PLAIN + MODES[mode])
    verdict(code == 0 and not same_run(a, b, mode), f"exit {code}: {same_run(a, b, mode)}\n{err[-3000:]}")


def test_unwritable_output_folder(root, model, verdict):
    """Nothing under the folder can be made or written (EACCES): one error line, nothing left behind.
    (Injected: this test may run as root, which ignores permission bits.)"""
    b = root / "unwritable"
    status, err = wait(spawn(["train", "--model", model, *PLAIN, *MODES["lora"], "--output-dir", b], b,
                             disk=(0, errno.EACCES)), b)
    msg = refused(status, err)
    verdict(msg is not None and "Permission denied" in msg and not b.exists(), f"exit {status}\n{err[-3000:]}")


# ---- run folders: writers, owners, flags, moves ------------------------------------------------------


def test_two_writers_on_one_folder(root, model, ref, stopped, verdict):
    """A second --resume while the first holds the folder is refused; the first finishes the run."""
    b = root / "two-writers"
    shutil.copytree(stopped("lora"), b)
    args = ["train", "--model", model, *PLAIN, *MODES["lora"], "--output-dir", b, "--resume"]
    first = spawn(args, b, stop="forward 2")  # its third step (marks count calls in each process)
    end = time.time() + TIMEOUT
    while "forward 2" not in marks_of(b) and time.time() < end:
        time.sleep(0.01)
    code, err = zoft(*args)
    Path(f"{b}.release").touch()
    status, first_err = wait(first, b)
    a = ref("plain-lora", PLAIN + MODES["lora"])
    verdict(refused(code, err) is not None and status == 0 and not same_run(a, b, "lora"),
            f"second writer: exit {code}; first: exit {status}, {same_run(a, b, 'lora')}\n{err[-1500:]}\n{first_err[-1500:]}")


def refused_untouched(folder: Path, *args) -> tuple[bool, str]:
    before = snapshot(folder)
    code, err = zoft(*args)
    return refused(code, err) is not None and snapshot(folder) == before, f"exit {code}\n{err[-2000:]}"


def test_output_dir_is_the_model(root, model, verdict):
    m = root / "model-copy"
    shutil.copytree(model, m)
    verdict(*refused_untouched(m, "train", "--model", m, *PLAIN, *MODES["lora"], "--output-dir", m))


def test_output_dir_holds_other_files(root, model, verdict):
    b = root / "notes"
    b.mkdir()
    (b / "notes.txt").write_text("mine")
    verdict(*refused_untouched(b, "train", "--model", model, *PLAIN, *MODES["lora"], "--output-dir", b))


def test_export_into_a_folder_with_other_files(root, ref, verdict):
    b = root / "export-notes"
    b.mkdir()
    (b / "notes.txt").write_text("mine")
    verdict(*refused_untouched(b, "export", ref("plain-lora", PLAIN + MODES["lora"]), "--merge", "--output-dir", b))


def test_replay_into_the_model(root, model, ref, verdict):
    m = root / "model-copy-replay"
    shutil.copytree(model, m)
    log = ref("plain-lora", PLAIN + MODES["lora"]) / "steps.jsonl"
    verdict(*refused_untouched(m, "replay", "--model", model, "--log", log, "--output-dir", m))


def test_overwrite_output_dir_replaces_only_zofts_files(root, model, ref, verdict):
    b = root / "overwrite"
    shutil.copytree(ref("plain-lora", PLAIN + MODES["lora"]), b)
    (b / "notes.txt").write_text("mine")
    code, err = zoft("train", "--model", model, *PLAIN, *MODES["lora"], "--output-dir", b, "--overwrite-output-dir")
    a = ref("plain-lora", PLAIN + MODES["lora"])
    verdict(code == 0 and (b / "notes.txt").read_text() == "mine" and not same_run(a, b, "lora"),
            f"exit {code}\n{err[-2000:]}")


@pytest.mark.parametrize("flag,value", [("--lr", "0.07"), ("--seed", "1"), ("--model", "llama")])
def test_resume_with_changed_flags_is_refused(root, stopped, verdict, flag, value, model):
    """Refused with one line naming the flag, before anything is written."""
    b = root / f"changed{flag}"
    shutil.copytree(stopped("lora"), b)
    value = make_tiny("llama", str(root)) if value == "llama" else value
    args = ["--model", model, *PLAIN, *MODES["lora"], flag, value]  # the later flag wins in argparse
    before = snapshot(b)
    code, err = zoft("train", *args, "--output-dir", b, "--resume")
    msg = refused(code, err)
    verdict(msg is not None and flag.lstrip("-") in msg and snapshot(b) == before, f"exit {code}\n{err[-2000:]}")


def test_resume_with_a_harmless_flag_changed(root, model, ref, stopped, verdict):
    b = root / "harmless"
    shutil.copytree(stopped("lora"), b)
    code, err = zoft("train", "--model", model, *PLAIN, *MODES["lora"], "--eval-batch-size", "5",
                     "--log-every", "7", "--output-dir", b, "--resume")
    a = ref("plain-lora", PLAIN + MODES["lora"])
    verdict(code == 0 and not same_run(a, b, "lora"), f"exit {code}: {same_run(a, b, 'lora')}\n{err[-2000:]}")


def test_moved_run_folder_resumes(root, model, ref, stopped, verdict):
    b = root / "moved" / "elsewhere"
    b.parent.mkdir()
    shutil.copytree(stopped("full"), root / "to-move")
    shutil.move(root / "to-move", b)
    code, err = zoft("train", "--model", model, *PLAIN, *MODES["full"], "--output-dir", b, "--resume")
    a = ref("plain-full", PLAIN + MODES["full"])
    verdict(code == 0 and not same_run(a, b, "full"), f"exit {code}: {same_run(a, b, 'full')}\n{err[-2000:]}")
