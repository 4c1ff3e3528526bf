"""The example scripts run end to end on a tiny random OPT, and fail in one line when offline."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny import make_tiny

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEMO, SUITE = EXAMPLES / "mezo_opt125m_demo.py", EXAMPLES / "mezo_lora_opt125m_suite.py"
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
SMALL = "--task rotten_tomatoes --n-train 32 --n-dev 16 --n-test 16 --batch-size 4 --device cpu".split()


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    return make_tiny("opt", str(tmp_path_factory.mktemp("tiny")))


def run(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # cwd: a temporary folder, so a failed run's default --output-dir (runs/...) lands there, not in the repo
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300)


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_demo(opt, tmp_path):
    out = tmp_path / "demo"
    p = run(DEMO, "--model", opt, *SMALL, "--steps", "4", "--eval-every", "2", "--output-dir", str(out),
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    r = last_json(p.stdout)
    assert r["steps"] == 4 and r["model"] == opt and r["path"] == "native opt"
    for k in ("zero_shot_accuracy", "final_accuracy", "best_dev_accuracy"):
        assert 0.0 <= r[k] <= 1.0
    assert r["seconds"] > 0 and r["seconds_per_step"] > 0 and 0.0 <= r["work_saved"] < 1.0
    assert "test accuracy: zero-shot" in p.stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_suite(opt, tmp_path):
    out = tmp_path / "suite"
    p = run(SUITE, "--model", opt, *SMALL, "--steps", "3", "--eval-every", "0", "--layers", "1-2",
            "--output-dir", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    r = last_json(p.stdout)
    assert r == json.loads((out / "summary.json").read_text())
    assert r["steps"] == 3 and r["task"] == "rotten_tomatoes"
    runs = {x["run"]: x for x in r["runs"]}
    assert list(runs) == ["zero-shot", "mezo-lora", "mezo-full (1-2)"]
    for x in runs.values():
        assert 0.0 <= x["accuracy"] <= 1.0
    for name in ("mezo-lora", "mezo-full (1-2)"):
        x = runs[name]
        assert x["seconds"] > 0 and x["seconds_per_step"] > 0 and 0.0 <= x["work_saved"] < 1.0
        assert x["trainable_parameters"] > 0
        metrics = (Path(x["output_dir"]) / "metrics.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in metrics]
        assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]
    # the full run trains two whole blocks, far more than LoRA's q/v adapters
    assert runs["mezo-full (1-2)"]["trainable_parameters"] > runs["mezo-lora"]["trainable_parameters"]
    assert "| mezo-lora |" in p.stdout and "|---|" in p.stdout


@pytest.mark.parametrize("script", [DEMO, SUITE], ids=["demo", "suite"])
def test_offline_default_model_fails_in_one_line(script, tmp_path):
    # facebook/opt-125m from the hub, which HF_HUB_OFFLINE forbids (an offline task: the data is checked first)
    p = run(script, "--task", "rotten_tomatoes", cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "facebook/opt-125m" in lines[0] and "--model /path/to/local/model" in lines[0]


def test_offline_imdb_names_data_dir(opt, tmp_path):
    p = run(DEMO, "--model", opt, "--steps", "1", "--output-dir", str(tmp_path / "imdb"), cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    err = p.stderr.strip().splitlines()[-1]
    assert err.startswith("error: imdb") and "--data-dir" in err and "rotten_tomatoes" in err
