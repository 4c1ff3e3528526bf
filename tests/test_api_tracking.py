"""The Python API (README's example, run as written on a tiny model), callbacks, and --report-to trackers:
TensorBoard event files read back, W&B offline runs written; forwards and seconds in metrics.jsonl."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import assert_user_error
from tests.tiny import make_tiny

README = Path(__file__).resolve().parent.parent / "README.md"
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def opt(tmp_path_factory) -> str:
    return make_tiny("opt", str(tmp_path_factory.mktemp("api")))


def readme_python() -> str:
    text = README.read_text()
    return re.search(r"## Python\n\n```python\n(.*?)```", text, re.S).group(1)


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_readme_example_runs(opt, tmp_path):
    code = readme_python().replace('"facebook/opt-125m"', repr(opt))  # the one change: a local tiny model
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert [ln.split()[-2] for ln in lines if ln.startswith("dev accuracy")] == ["10", "20"]
    acc, out = lines[-1].split()
    assert 0 <= float(acc) <= 1 and out == "runs/python"
    run = tmp_path / "runs" / "python"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    # TensorBoard: the same numbers as metrics.jsonl, read back by tensorboard's own reader
    tb = scalars(run / "tensorboard")
    assert tb["train/loss"] == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in steps]
    assert [s for s, _ in tb["eval/accuracy"]] == [10, 20]
    assert [v for _, v in tb["train/forwards"]] == [2 * r["step"] for r in steps]
    # the in-memory splits are used as given and recorded, like separate split files
    splits = json.loads((run / "splits.json").read_text())
    assert splits["name"] == "datasets" and [len(splits["splits"][k]["indices"]) for k in ("dev", "test")] == [8, 8]
    assert {splits["splits"][k]["pool"] for k in ("train", "dev", "test")} == {"train", "dev", "test"}


def test_trainer_from_list_with_callbacks(opt, tmp_path):
    from zoft import Callback, ModelConfig, RunConfig, TaskConfig, TrainConfig, Trainer, ZOConfig

    seen = {"log": [], "eval": []}

    class Keep(Callback):
        def on_log(self, row):
            seen["log"].append(row)

        def on_evaluate(self, row):
            seen["eval"].append(row)

    train = [{"prompt": f"{i} plus one is", "completion": f" {i + 1}"} for i in range(20)]
    cfg = TrainConfig(ModelConfig(model=opt, device="cpu"), TaskConfig(n_train=16, n_dev=4),
                      ZOConfig(lr=1e-3, batch_size=4, directions=2),
                      RunConfig(steps=4, eval_every=2, zero_shot=False, output_dir=str(tmp_path / "r")))
    res = Trainer(cfg, train_dataset=train, eval_dataset=train[:4], callbacks=[Keep()]).train()
    assert "final_accuracy" not in res  # no test set given: no final evaluation
    assert [r["step"] for r in seen["log"]] == [1, 2, 3, 4] and [r["step"] for r in seen["eval"]] == [2, 4]
    assert [r["forwards"] for r in seen["log"]] == [4, 8, 12, 16]  # 2 passes × 2 directions a step
    assert all(r["seconds"] > 0 for r in seen["log"]) and "dev_f1" in seen["eval"][0]
    on_disk = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert on_disk == seen["log"][:2] + seen["eval"][:1] + seen["log"][2:] + seen["eval"][1:]


def test_wandb_offline(opt, tmp_path):
    p = subprocess.run([sys.executable, "-m", "zoft", "train", "--model", opt, "--task", "rotten_tomatoes",
                        "--n-train", "8", "--n-test", "4", "--batch-size", "4", "--steps", "3", "--device", "cpu",
                        "--no-zero-shot", "--report-to", "wandb", "--output-dir", tmp_path / "w"],
                       capture_output=True, text=True, env=ENV | {"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
                       timeout=300)
    assert p.returncode == 0, p.stderr
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs


def test_trackio_missing_is_one_line(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("trackio") is not None:
        pytest.skip("trackio is installed here; the missing-package message can't be seen")
    from zoft.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--task", "rotten_tomatoes", "--report-to", "trackio", "--model", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert_user_error(subprocess.CompletedProcess([], 2, "", err), "--report-to trackio", "pip install trackio")
