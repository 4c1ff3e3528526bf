"""The README's commands for data, config files and tracking, run as written on a tiny model.

Each command is looked up in README.md verbatim (so the docs cannot drift from what is tested); "..."
stands for the model and run options, filled in here with a tiny random OPT and a few steps.
"""

import json
import os
import shlex
from pathlib import Path

import datasets
import pytest

from tests.tiny import make_tiny

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                    "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
COMMANDS = [  # (README command, what it must produce)
    "zoft train --task data.jsonl ...",
    'zoft train --task data.csv --label-names terrible great --template "{text} It was"',
    "zoft train --train-file tr.parquet --validation-file va.parquet --test-file te.parquet ...",
    "zoft train --task my_folder ...",
    "zoft train --task stanfordnlp/imdb --dataset-config plain_text --label-names terrible great ...",
    "zoft train --config run.yaml",
    "zoft train --config RUN/zoft_config.json --output-dir again",
    "zoft train ... --report-to tensorboard",
    "WANDB_MODE=offline zoft train ... --report-to wandb",
    "zoft plot runs/a runs/b --x forwards --output curves.png",
]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> tuple[Path, str]:
    """A folder holding every file the commands name."""
    d = tmp_path_factory.mktemp("readme")
    opt = make_tiny("opt", str(d / "models"))
    rows = [{"text": f"review {i}", "label": i % 2} for i in range(24)]
    mc = [{"input": f"q{i}", "candidates": [" no", " yes"], "answer": i % 2} for i in range(24)]
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
    datasets.Dataset.from_list(rows).to_csv(str(d / "data.csv"), index=False)
    for name, part in (("tr", rows[:16]), ("va", rows[16:20]), ("te", rows[20:])):
        datasets.Dataset.from_list([r | {"candidates": [" no", " yes"], "input": r["text"], "answer": r["label"]}
                                    for r in part]).to_parquet(str(d / f"{name}.parquet"))
    datasets.DatasetDict(train=datasets.Dataset.from_list(mc[:16]),
                         test=datasets.Dataset.from_list(mc[16:])).save_to_disk(str(d / "my_folder"))
    (d / "run.yaml").write_text(f"model: {opt}\ntask: data.jsonl\ndevice: cpu\nsteps: 2\nbatch_size: 2\n"
                                "n_train: 8\nn_test: 4\nzero_shot: false\noutput_dir: runs/yaml\n")
    return d, opt


def expand(cmd: str, opt: str, n: int) -> tuple[list[str], dict]:
    """README command -> (zoft argv, environment variables it sets); "..." -> the tiny model and a short run."""
    words, env = shlex.split(cmd), {}
    while "=" in words[0]:
        k, v = words.pop(0).split("=", 1)
        env[k] = v
    short = ["--model", opt, "--device", "cpu", "--steps", "2", "--batch-size", "2", "--n-train", "8", "--n-dev", "4",
             "--n-test", "4", "--no-zero-shot"]
    if words[1] == "train" and "--output-dir" not in words and "--config" not in words:
        short += ["--output-dir", f"runs/r{n}"]
    if words[1] == "train" and "..." not in words and "--config" not in words:
        words.append("...")
    return [w for x in words[1:] for w in (short if x == "..." else [x])], env


def zoft(argv: list[str], capsys) -> tuple[int, str, str]:
    from zoft.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("n", range(len(COMMANDS)))
def test_readme_command(work, n, monkeypatch, capsys):
    d, opt = work
    cmd = COMMANDS[n]
    assert cmd in README, f"README no longer shows: {cmd}"
    monkeypatch.chdir(d)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    if "RUN/zoft_config.json" in cmd:  # the run to re-run: the YAML one
        if not (d / "runs/yaml/adapter").exists():
            assert zoft(expand(COMMANDS[5], opt, 5)[0], capsys)[0] == 0
        cmd = cmd.replace("RUN", "runs/yaml")
    if cmd.startswith("zoft plot"):
        for run in ("a", "b"):
            if not (d / "runs" / run).exists():
                assert zoft(expand(f"zoft train ... --output-dir runs/{run}", opt, 0)[0], capsys)[0] == 0
    argv, env = expand(cmd, opt, n)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, out, err = zoft(argv, capsys)
    if "stanfordnlp/imdb" in cmd:  # the hub is out of reach here: one clear line, exit 2
        assert code == 2 and "could not load dataset 'stanfordnlp/imdb'" in err, err
        return
    assert code == 0, err
    if cmd.startswith("zoft plot"):
        assert (d / "curves.png").read_bytes()[:4] == b"\x89PNG"
    elif "tensorboard" in cmd:
        assert list((d / f"runs/r{n}/tensorboard").glob("events.out.tfevents.*"))
    elif "wandb" in cmd:
        assert list((d / f"runs/r{n}/wandb").glob("offline-run-*"))
    elif "--output-dir again" in cmd:
        assert (d / "again/adapter/adapter_model.safetensors").read_bytes() == \
            (d / "runs/yaml/adapter/adapter_model.safetensors").read_bytes()
    else:
        assert json.loads(out.splitlines()[-1])["steps"] == 2
