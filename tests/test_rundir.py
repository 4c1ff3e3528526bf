"""Run folders: zoft writes only into folders it owns, a resume is checked before anything is written,
one process writes a run at a time, and `zoft eval` on a run scores the splits that run recorded.

Runs go through zoft.cli.main in this process (tests/test_durability.py's `zoft`); the lock test
holds a real second process at a known point with test_durability's driver.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.test_durability import DATA, start_marked, zoft
from tests.tiny import make_tiny

RUN = [*DATA, "--steps", "6", "--save-every", "3", "--eval-every", "3", "--lr", "0.05", "--n-test", "4"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rundir")


@pytest.fixture(scope="module")
def model(root) -> str:
    return make_tiny("opt", str(root))


@pytest.fixture(scope="module")
def run(root, model) -> Path:
    """A finished 6-step LoRA run (dev evaluations every 3 steps, a 4-example test split)."""
    out = root / "run"
    code, err, _ = zoft("train", "--model", model, *RUN, "--output-dir", out)
    assert code == 0, err
    return out


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes (and mtimes folded in)."""
    return {str(p.relative_to(folder)): p.read_bytes() + str(p.stat().st_mtime_ns).encode()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("zoft: error: ")]
    assert len(lines) == 1, err[-2000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ---- zoft writes only into folders it owns -----------------------------------------------------------


def test_the_models_own_folder_is_refused_before_anything_is_written(model):
    before = files(Path(model))
    code, err, _ = zoft("train", "--model", model, *RUN, "--output-dir", model)
    one_error(code, err, "model's own folder")
    code, err, _ = zoft("train", "--model", model, *RUN, "--output-dir", model, "--overwrite-output-dir")
    one_error(code, err, "model's own folder")
    assert files(Path(model)) == before


def test_a_folder_that_is_not_a_zoft_run_is_refused(root, model):
    other = root / "papers"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    (other / "config.json").write_text(json.dumps({"model_type": "opt"}))
    before = files(other)
    for extra in ([], ["--overwrite-output-dir"], ["--resume"]):
        code, err, _ = zoft("train", "--model", model, *RUN, "--output-dir", other, *extra)
        one_error(code, err, str(other), "not a zoft run folder")
    assert files(other) == before
    f = root / "a-file"
    f.write_text("x")
    one_error(*zoft("train", "--model", model, *RUN, "--output-dir", f)[:2], "is a file")


def test_a_failed_start_leaves_no_folder(root, model):
    out = root / "never"
    code, err, _ = zoft("train", "--model", root / "no-such-model", *RUN, "--output-dir", out)
    one_error(code, err, "does not exist")
    assert not out.exists()


def test_an_existing_run_needs_resume_or_overwrite(root, model, run):
    out = root / "again"
    shutil.copytree(run, out)
    (out / "notes.txt").write_text("mine")
    before = files(out)
    one_error(*zoft("train", "--model", model, *RUN, "--output-dir", out)[:2], "--resume", "--overwrite-output-dir")
    assert files(out) == before
    code, err, _ = zoft("train", "--model", model, *RUN, "--steps", "3", "--output-dir", out, "--overwrite-output-dir")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"  # not zoft's: left alone
    assert json.loads((out / "zoft_config.json").read_text())["run"]["steps"] == 3
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x] == [1, 2, 3]
    assert not (out / "zoft.lock").exists()


def test_a_run_from_before_the_rename_still_reads(root, model, run):
    """zoft_config.json used to be config.json: such a run is still recognised, exported and resumed."""
    old = root / "legacy"
    shutil.copytree(run, old)
    os.replace(old / "zoft_config.json", old / "config.json")
    code, err, _ = zoft("export", old, "--output-dir", root / "legacy-export")
    assert code == 0, err
    assert (root / "legacy-export" / "adapter_model.safetensors").is_file()
    code, err, _ = zoft("train", "--model", model, *RUN, "--output-dir", old, "--resume", "--steps", "7")
    assert code == 0, err


def test_export_and_replay_write_only_new_or_their_own_folders(root, model, run):
    other = root / "busy"
    other.mkdir(exist_ok=True)
    (other / "keep.txt").write_text("x")
    for args in (["export", run, "--merge"], ["replay", "--model", model, "--log", run / "steps.jsonl"]):
        for target, needle in ((other, "not empty"), (Path(model), "model's own folder")):
            before = files(target)
            one_error(*zoft(*args, "--output-dir", target, "--overwrite-output-dir")[:2], needle)
            assert files(target) == before
        out = root / f"{args[0]}-out"
        code, err, _ = zoft(*args, "--output-dir", out)
        assert code == 0, err
        one_error(*zoft(*args, "--output-dir", out)[:2], "--overwrite-output-dir")
        code, err, _ = zoft(*args, "--output-dir", out, "--overwrite-output-dir")
        assert code == 0, err
        assert not [p for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # nothing left aside


# ---- resume is checked before anything is written -------------------------------------------------


CHANGED = [  # (flags, what the one-line error must name)
    (["--lr", "0.01"], "--lr 0.05 → 0.01"),
    (["--seed", "3"], "--seed 0 → 3"),
    (["--eps", "0.02"], "--eps 0.01 → 0.02"),
    (["--batch-size", "2"], "--batch-size 4 → 2"),
    (["--schedule", "cosine"], "--schedule 'constant' → 'cosine'"),
    (["--weight-decay", "0.1"], "--weight-decay 0.0 → 0.1"),
    (["--lora-alpha", "8"], "--lora-alpha 16.0 → 8.0"),
    (["--layers", "1-2"], "--layers '' → '1-2'"),
    (["--dtype", "bfloat16"], "--dtype 'float32' → 'bfloat16'"),
    (["--n-train", "16"], "--n-train 32 → 16"),
    (["--task", "sst2"], "--task 'rotten_tomatoes' → 'sst2'"),
    (["--guard-threshold", "2"], "--guard-threshold 0.0 → 2.0"),
    (["--mode", "full"], "--mode 'lora' → 'full'"),
    (["--directions", "2"], "--directions 1 → 2"),
]


@pytest.mark.parametrize("flags,needle", CHANGED, ids=[c[0][0] for c in CHANGED])
def test_resume_with_a_trajectory_flag_changed_is_refused(run, model, flags, needle):
    before = files(run)
    code, err, _ = zoft("train", "--model", model, *RUN, "--output-dir", run, "--resume", *flags)
    one_error(code, err, "--resume", needle)
    assert files(run) == before


def test_resume_with_another_model_is_refused_once_its_weights_are_seen(root, run):
    other = make_tiny("llama", str(root))
    before = files(run)
    code, err, _ = zoft("train", "--model", other, *RUN, "--output-dir", run, "--resume")
    one_error(code, err, "--resume", "other weights")
    assert files(run) == before


def test_resume_may_change_what_does_not_change_the_trajectory(root, model, run):
    out = root / "harmless"
    shutil.copytree(run, out)
    code, err, _ = zoft("train", "--model", model, *RUN, "--output-dir", out, "--resume", "--steps", "8",
                        "--eval-batch-size", "3", "--log-every", "1", "--save-every", "4", "--no-zero-shot")
    assert code == 0, err
    assert json.loads((out / "checkpoint" / "state.json").read_text())["next_step"] == 8
    assert json.loads((out / "zoft_config.json").read_text())["run"]["eval_batch_size"] == 3


def test_data_that_changed_under_a_run_is_refused(root, model):
    data = root / "mine.jsonl"
    rows = [{"input": f"q{i} It was", "candidates": [" bad", " good"], "answer": i % 2} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "mine"
    args = ["train", "--model", model, "--task", data, "--n-train", "8", "--n-dev", "4", "--n-test", "4",
            "--batch-size", "4", "--device", "cpu", "--steps", "2", "--output-dir", out]
    assert zoft(*args)[0] == 0
    recorded = json.loads((out / "splits.json").read_text())["splits"]
    trained = recorded["train"]["indices"]
    unused = next(i for i in range(40) if all(i not in rec["indices"] for rec in recorded.values()))
    rows[unused]["input"] += " (edited)"  # a row no split holds: the run is the same run
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert zoft(*args, "--resume", "--steps", "3")[0] == 0
    rows[trained[0]]["answer"] = 1 - rows[trained[0]]["answer"]  # a training row's label edited
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = files(out)
    code, err, _ = zoft(*args, "--resume")
    one_error(code, err, "differs from the one", "splits.json")
    assert files(out) == before


# ---- one writer per run folder ----------------------------------------------------------------------


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(root, model, run):
    out = root / "locked"
    shutil.copytree(run, out)
    args = ["train", "--model", model, *RUN, "--steps", "12", "--output-dir", out, "--resume"]
    pid = start_marked(args, out, "forward 3")  # a real second process, held inside its step 9
    marks = Path(str(out) + ".marks")
    end = time.time() + 120
    while not (marks.exists() and "forward 3" in marks.read_text().splitlines()):
        assert time.time() < end and os.waitpid(pid, os.WNOHANG) == (0, 0), "the first writer never got going"
        time.sleep(0.01)
    lock = json.loads((out / "zoft.lock").read_text())
    assert lock["pid"] == pid
    before = files(out)
    for extra in ([], ["--overwrite-output-dir"]):
        code, err, _ = zoft(*[a for a in args if a != "--resume"], *(extra or ["--resume"]))
        one_error(code, err, "in use by another zoft process", f"pid {pid}")
    assert files(out) == before
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert json.loads((out / "zoft.lock").read_text())["pid"] == pid  # left behind by the kill
    code, err, _ = zoft(*args)
    assert code == 0, err
    assert f"took over the lock of pid {pid}" in err
    assert not (out / "zoft.lock").exists()


# ---- zoft eval on a run scores the run's own splits -----------------------------------------------------


def test_eval_on_a_runs_adapter_uses_the_runs_recorded_test_split(run):
    result = json.loads((run / "results.json").read_text())
    splits = json.loads((run / "splits.json").read_text())
    assert len(splits["splits"]["test"]["indices"]) == 4 and len(splits["splits"]["train"]["indices"]) == 32
    code, err, out = zoft("eval", "--adapter", run / "adapter", "--device", "cpu")  # no --model, --task, --n-test
    assert code == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["n"] == 4 and got["splits"] == "the run's" and got["accuracy"] == result["final_accuracy"]
    code, err, out = zoft("eval", "--run", run, "--split", "dev", "--device", "cpu")
    got = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and got["n"] == 8 and got["accuracy"] == result["best_dev_accuracy"]  # adapter/ is the best dev's


def test_eval_on_a_full_parameter_run(root, model):
    out = root / "full"
    code, err, _ = zoft("train", "--model", model, *RUN, "--mode", "full", "--layers", "1-2", "--lr", "1e-3",
                        "--output-dir", out)
    assert code == 0, err
    code, err, stdout = zoft("eval", "--run", out, "--device", "cpu")
    assert code == 0, err
    got = json.loads(stdout.strip().splitlines()[-1])
    assert got["n"] == 4 and got["accuracy"] == json.loads((out / "results.json").read_text())["final_accuracy"]


def test_an_empty_evaluation_split_is_an_error(model):
    code, err, _ = zoft("eval", "--model", model, "--n-test", "0", "--device", "cpu")
    one_error(code, err, "test split", "empty")
    code, err, _ = zoft("train", "--model", model, *DATA, "--n-dev", "0", "--eval-every", "2", "--steps", "2",
                        "--output-dir", "/nonexistent/never")
    one_error(code, err, "--eval-every 2 evaluates on the dev split, which came out empty")


def test_numbered_checkpoints_with_a_total_limit(root, model):
    """--save-total-limit 2 with --save-every 2 over 6 steps: checkpoint-4/ and checkpoint-6/ stay (each a
    whole checkpoint, sharing checkpoint/'s files through hard links), checkpoint-2/ is pruned; the run is
    otherwise the run without them (same adapter), and --overwrite-output-dir counts them as zoft's."""
    base = [*DATA, "--steps", "6", "--save-every", "2", "--lr", "0.05"]
    a, b = root / "plain", root / "numbered"
    assert zoft("train", "--model", model, *base, "--output-dir", a)[0] == 0
    code, err, _ = zoft("train", "--model", model, *base, "--save-total-limit", "2", "--output-dir", b)
    assert code == 0, err
    kept = sorted(n for n in os.listdir(b) if n.startswith("checkpoint-"))
    assert kept == ["checkpoint-4", "checkpoint-6"]
    for n in kept:
        state = json.loads((b / n / "state.json").read_text())
        assert state["next_step"] == int(n.split("-")[1])
    final = b / "checkpoint" / "adapter_model.safetensors"
    assert os.path.samefile(final, b / "checkpoint-6" / "adapter_model.safetensors")  # a link, not a copy
    assert (a / "adapter" / "adapter_model.safetensors").read_bytes() == (b / "adapter" / "adapter_model.safetensors").read_bytes()
    code, err, _ = zoft("train", "--model", model, *base, "--overwrite-output-dir", "--output-dir", b)
    assert code == 0, err
    assert not any(n.startswith("checkpoint-") for n in os.listdir(b))
