"""`zoft compare`: arms from seeds, steps / forwards / training seconds to a threshold, on hand-written run
folders whose answers are known; and end to end on tiny training runs (--eval-test curves, train_seconds
that leave evaluations out, the optimizer state's size in results.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.tiny import make_tiny
from zoft.cli import main
from zoft.compare import compare, parse_thresholds, table
from zoft.config import ModelConfig, RunConfig, TaskConfig, TrainConfig, ZOConfig
from zoft.errors import ZoftError
from zoft.train.loop import train


def write_run(folder: Path, optimizer: str, seed: int, lr: float, curve: dict[int, float], rows_per_step: int,
              s_per_step: float, final: float | None, split: str = "dev", state_bytes: int = 0) -> Path:
    """A run folder as zoft train leaves it: config, a step row per step, an evaluation row per curve point."""
    folder.mkdir(parents=True)
    (folder / "zoft_config.json").write_text(json.dumps({
        "model": {"model": "m", "dtype": "float32"}, "task": {"task": "rotten_tomatoes", "n_train": 100, "template": ""},
        "zo": {"optimizer": optimizer, "lr": lr, "directions": 1, "mode": "lora"}, "run": {"steps": 40, "seed": seed}}))
    lines = []
    for step in range(1, 41):
        lines.append({"step": step, "loss": 1.0, "forwards": rows_per_step * step,
                      "train_seconds": round(s_per_step * step, 3), "seconds": 100 + 2 * step})
        if step in curve:  # dev always; test too with --eval-test
            lines.append({"step": step, "dev_accuracy": curve[step]} | (
                {"test_accuracy": curve[step] + 0.01} if split == "test" else {}))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if final is not None:
        (folder / "results.json").write_text(json.dumps({
            "final_accuracy": final, "seconds_per_step": s_per_step, "peak_memory_mb": 500.0,
            "optimizer_state_bytes": state_bytes}))
    return folder


def test_arms_average_over_seeds_and_count_who_reached(tmp_path):
    runs = [write_run(tmp_path / "sgd0", "zo-sgd", 0, 1e-3, {10: 0.7, 20: 0.81, 30: 0.85}, 2, 0.01, 0.85),
            write_run(tmp_path / "sgd1", "zo-sgd", 1, 1e-3, {10: 0.75, 20: 0.79, 30: 0.82, 40: 0.86}, 2, 0.01, 0.87),
            write_run(tmp_path / "fzoo0", "fzoo", 0, 1e-3, {10: 0.83}, 9, 0.03, 0.80),
            write_run(tmp_path / "fzoo1", "fzoo", 1, 1e-3, {10: 0.60, 20: 0.7}, 9, 0.03, None)]
    split, rows = compare([str(r) for r in runs], [0.80, 0.84])
    assert split == "dev"
    by = {r["arm"]: r for r in rows}
    assert set(by) == {"zo-sgd", "fzoo"}  # the settings that tell arms apart: the optimizer only
    sgd, fzoo = by["zo-sgd"], by["fzoo"]
    assert sgd["runs"] == 2 and sgd["seeds"] == [0, 1]
    assert sgd["reached_0.8"] == 2 and sgd["steps_to_0.8"] == 25  # 20 and 30
    assert sgd["forwards_to_0.8"] == 50 and math.isclose(sgd["seconds_to_0.8"], 0.25)
    assert sgd["steps_to_0.84"] == 35  # 30 and 40
    assert math.isclose(sgd["final"], 0.86) and math.isclose(sgd["final_std"], math.sqrt(2) * 0.01)
    assert fzoo["reached_0.8"] == 1 and fzoo["steps_to_0.8"] == 10 and fzoo["forwards_to_0.8"] == 90
    assert fzoo["reached_0.84"] == 0 and fzoo["steps_to_0.84"] is None
    assert fzoo["finished"] == 1 and fzoo["final"] == 0.80  # the run without results.json has no final score
    text = table(split, rows, [0.80, 0.84])
    assert "| fzoo | 2 | 10 (1/2) | 90 | 0.3 |" in text and "0.800 ± 0.000 (1/2)" in text


def test_the_test_curve_is_used_when_every_run_has_one(tmp_path):
    a = write_run(tmp_path / "a", "zo-sgd", 0, 1e-3, {10: 0.9}, 2, 0.01, 0.9, split="test")
    b = write_run(tmp_path / "b", "zo-sgd", 0, 1e-4, {20: 0.9}, 2, 0.01, 0.9, split="test")
    split, rows = compare([str(a), str(b)], [0.8])
    assert split == "test" and {r["arm"] for r in rows} == {"zo-sgd lr=0.001", "zo-sgd lr=0.0001"}
    c = write_run(tmp_path / "c", "zo-sgd", 0, 1e-5, {30: 0.9}, 2, 0.01, 0.9, split="dev")
    assert compare([str(a), str(c)], [0.8])[0] == "dev"  # one run without a test curve: all on dev
    with pytest.raises(ZoftError, match="no test evaluations"):
        compare([str(c)], [0.8], "test")


@pytest.mark.parametrize("text", ["", "0.8,x", "nan"])
def test_bad_thresholds_are_refused(text):
    with pytest.raises(ZoftError, match="--thresholds"):
        parse_thresholds(text)


def test_a_folder_that_is_not_a_run_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("zoft: error:") and "--output-dir of a zoft train run" in err[0]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("compare")
    folder = make_tiny("opt", str(root))
    runs = []
    for name, seed in (("zo-sgd", 0), ("zo-sgd", 1), ("zo-adam", 0)):
        out = root / f"{name}_{seed}"
        train(TrainConfig(ModelConfig(model=folder), TaskConfig(n_train=16, n_dev=8, n_test=8),
                          ZOConfig(mode="lora", optimizer=name, lr=1e-2, batch_size=4, directions=2),
                          RunConfig(steps=12, output_dir=str(out), seed=seed, eval_every=4, eval_test=True)))
        runs.append(out)
    return runs


def test_training_logs_what_compare_reads(tiny_runs):
    rows = [json.loads(x) for x in open(tiny_runs[0] / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "dev_accuracy" in r]
    assert [r["step"] for r in evals] == [4, 8, 12] and all("test_accuracy" in r for r in evals)
    ts = [r["train_seconds"] for r in steps]
    assert ts == sorted(ts) and all(r["train_seconds"] <= r["seconds"] for r in steps)
    results = json.loads((tiny_runs[0] / "results.json").read_text())
    assert results["forwards"] == 4 * 12 and results["optimizer"] == "zo-sgd" and results["optimizer_state_bytes"] == 0
    adam = json.loads((tiny_runs[2] / "results.json").read_text())
    # ZO-Adam keeps m and v in float32 (8 bytes per trained parameter) and its int64 step count
    assert adam["optimizer_state_bytes"] == 8 * adam["trained_parameters"] + 8


def test_compare_on_trained_runs(tiny_runs, capsys):
    main(["compare", *map(str, tiny_runs), "--thresholds", "0,1.01", "--json"])
    rows = {r["arm"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"zo-sgd", "zo-adam"} and rows["zo-sgd"]["runs"] == 2 and rows["zo-sgd"]["split"] == "test"
    # every score is ≥ 0: reached at the first evaluation, after 4 steps of 4 forward rows
    assert rows["zo-sgd"]["steps_to_0"] == 4 and rows["zo-sgd"]["forwards_to_0"] == 16
    assert rows["zo-adam"]["reached_1.01"] == 0
    main(["compare", *map(str, tiny_runs)])
    assert "| zo-adam | 1 |" in capsys.readouterr().out


def test_eval_test_needs_eval_every():
    with pytest.raises(ZoftError, match="--eval-every"):
        RunConfig(eval_test=True)


def test_train_seconds_leave_evaluations_out(tmp_path, monkeypatch):
    import time

    import zoft.train.loop as loop

    real = loop.evaluation_row

    def slow(*a, **k):  # an evaluation that takes 0.4 s more: none of it may count as training
        time.sleep(0.4)
        return real(*a, **k)

    monkeypatch.setattr(loop, "evaluation_row", slow)
    real_finish = loop.finish

    def slow_finish(*a, **k):  # the final test evaluation of the best checkpoint: after training, not part of it
        time.sleep(1.0)
        return real_finish(*a, **k)

    monkeypatch.setattr(loop, "finish", slow_finish)
    folder = make_tiny("llama", str(tmp_path))
    out = tmp_path / "run"
    result = train(TrainConfig(ModelConfig(model=folder), TaskConfig(n_train=16, n_dev=8, n_test=8),
                      ZOConfig(mode="lora", lr=1e-2, batch_size=4), RunConfig(steps=12, output_dir=str(out), eval_every=4)))
    steps = {r["step"]: r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r}
    wall = steps[12]["seconds"] - steps[1]["seconds"]  # two evaluations (after steps 4 and 8) fall in between
    assert steps[12]["train_seconds"] - steps[1]["train_seconds"] < wall - 0.7
    from zoft.train.checkpoint import logged_train_seconds

    assert logged_train_seconds(str(out / "metrics.jsonl")) == steps[12]["train_seconds"]  # where --resume goes on from
    # results.json's train_seconds is the run's training time too: not the final evaluation's second
    assert result["train_seconds"] < steps[12]["train_seconds"] + 0.5
    assert json.loads((out / "results.json").read_text())["train_seconds"] == result["train_seconds"]
