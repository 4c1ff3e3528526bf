"""Data through the `datasets` layer (zoft.tasks.rows): every format and source, before the model loads.

TRL prompt/completion, text/label CSV, chat messages, parquet, separate train/validation/test files, a
save_to_disk folder, a folder of split files, and a hub id (unreachable here: a clear one-line error).
"""

import json
import time
from pathlib import Path

import datasets
import pytest

from tests.test_cli import assert_user_error, read_jsonl
from tests.tiny import make_tiny
from zoft.config import RunConfig, TaskConfig, TrainConfig
from zoft.errors import ZoftError
from zoft.tasks import Example, load_task, sample_splits
from zoft.tasks.rows import chat_renderer
from zoft.train.resume import prepare_data

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def opt(tmp_path_factory) -> str:
    """A tiny OPT whose tokenizer carries a chat template."""
    from transformers import AutoTokenizer

    folder = make_tiny("opt", str(tmp_path_factory.mktemp("data")))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(folder)
    return folder


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
        import subprocess

        return subprocess.CompletedProcess(args, code, out, err)

    return run


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def tc(**kw) -> TaskConfig:
    return TaskConfig(**kw)


SHORT = ["--device", "cpu", "--steps", "2", "--batch-size", "2", "--no-zero-shot", "--log-every", "0"]


def test_trl_prompt_completion_trains(opt, tmp_path, zoft_here):
    rows = [{"prompt": f"Q{i}: 2+{i}=", "completion": f" {2 + i}"} for i in range(20)]  # test region: 4 rows
    path = write_jsonl(tmp_path / "trl.jsonl", rows)
    task = load_task(tc(task=path))
    assert task.kind == "gen" and task.load_split("train")[0] == Example("Q0: 2+0=", [" 2"], 0, "gen")
    p = zoft_here("train", "--model", opt, "--task", path, "--n-train", "8", "--n-dev", "0", "--n-test", "4",
                  *SHORT, "--output-dir", tmp_path / "run")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.splitlines()[-1])
    assert res["metric"] == "f1" and len(read_jsonl(tmp_path / "run" / "test_predictions.jsonl")) == 4


def test_text_label_csv_with_label_names(opt, tmp_path, zoft_here):
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,sentiment\n" + "".join(f'"film {i}, really",{"good" if i % 2 else "bad"}\n' for i in range(20)))
    cfg = tc(task=str(csv), text_column="review", label_column="sentiment", label_names=["bad", "good"],
             template="{review} It was")
    pool = load_task(cfg).load_split("train")
    assert pool[1] == Example("film 1, really It was", [" bad", " good"], 1)  # label by name
    p = zoft_here("train", "--model", opt, "--task", csv, "--text-column", "review", "--label-column", "sentiment",
                  "--label-names", "bad", "good", "--n-train", "8", "--n-test", "4", *SHORT,
                  "--output-dir", tmp_path / "run")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1])["metric"] == "accuracy"
    # without names there is nothing to score the labels by: a one-line error before any model loads
    p = zoft_here("train", "--model", tmp_path / "no-model", "--task", csv, "--text-column", "review",
                  "--label-column", "sentiment")
    assert_user_error(p, "reviews.csv", "--label-names")


def test_chat_messages_through_chat_template(opt, tmp_path, zoft_here):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"hello {i}"}]}
            for i in range(10)]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(opt)
    ex = load_task(tc(task=path), chat_renderer(lambda: tok)).load_split("train")[3]
    assert ex == Example("<|user|>hi 3\n<|assistant|>", ["hello 3"], 0, "gen")
    p = zoft_here("train", "--model", opt, "--task", path, "--n-train", "6", "--n-test", "2", *SHORT,
                  "--output-dir", tmp_path / "run")
    assert p.returncode == 0, p.stderr
    with pytest.raises(ZoftError, match="chat template"):  # the GPT-2 tokenizer alone has none
        from tests.helpers_tok import gpt2_tokenizer

        load_task(tc(task=path), chat_renderer(gpt2_tokenizer))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ZoftError, match=r"bad.jsonl:1: the last message must be .*assistant"):
        load_task(tc(task=bad), chat_renderer(lambda: tok))


def test_parquet_and_json(tmp_path):
    rows = [{"input": f"q{i}", "candidates": [" no", " yes"], "answer": i % 2} for i in range(6)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(rows))  # one JSON array, not lines
    for name in ("d.parquet", "d.json"):
        pool = load_task(tc(task=str(tmp_path / name))).load_split("train")
        assert pool == [Example(f"q{i}", [" no", " yes"], i % 2) for i in range(6)], name
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ZoftError, match="could not read .*broken.parquet"):
        load_task(tc(task=str(tmp_path / "broken.parquet")))


def rows_of(tag: str, n: int) -> list[dict]:
    return [{"text": f"{tag} {i}", "label": i % 2} for i in range(n)]


def test_separate_files_give_each_split(tmp_path):
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", rows_of(s, n)) for s, n in (("tr", 30), ("va", 9), ("te", 7))}
    cfg = tc(train_file=files["tr"], validation_file=files["va"], test_file=files["te"], label_names=["n", "y"])
    task = load_task(cfg)
    sp = sample_splits(task, 20, 5, 100, seed=3)
    assert {len(v) for v in sp.values()} and (len(sp["train"]), len(sp["dev"]), len(sp["test"])) == (20, 5, 7)
    assert all(e.prompt.startswith(tag) for key, tag in (("train", "tr"), ("dev", "va"), ("test", "te"))
               for e in sp[key])
    assert sample_splits(task, 20, 5, 100, seed=3) == sp  # deterministic
    assert sample_splits(task, 20, 5, 100, seed=4)["test"] == sp["test"]  # the test set never moves with --seed


def test_folder_of_split_files_and_save_to_disk(tmp_path):
    folder = tmp_path / "csvs"
    folder.mkdir()
    for split, n in (("train", 12), ("validation", 4), ("test", 5)):
        datasets.Dataset.from_list(rows_of(split, n)).to_csv(str(folder / f"{split}.csv"))
    sp = sample_splits(load_task(tc(task=str(folder), label_names=["n", "y"])), 100, 100, 100)
    assert [len(sp[k]) for k in ("train", "dev", "test")] == [12, 4, 5]

    feats = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["terrible", "great"])})
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(rows_of(s, n), features=feats)
                               for s, n in (("train", 10), ("test", 3))})
    dd.save_to_disk(str(tmp_path / "saved"))
    task = load_task(tc(task=str(tmp_path / "saved"), template="{text} It was"))
    assert task.load_split("test")[1] == Example("test 1 It was", [" terrible", " great"], 1)  # ClassLabel names
    sp = sample_splits(task, 8, 100, 100)
    assert [len(sp[k]) for k in ("train", "dev", "test")] == [8, 2, 3]  # no validation split: dev from train


def test_hub_id_unreachable_is_one_line(tmp_path, zoft_here, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t = time.time()
    p = zoft_here("train", "--model", tmp_path / "no-model", "--task", "stanfordnlp/imdb")
    assert_user_error(p, "stanfordnlp/imdb", "hub", "--train-file")
    assert time.time() - t < 10


def test_bad_data_fails_before_the_model(tmp_path, zoft_here):
    bad = write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "reply": "b"}])
    p = zoft_here("train", "--model", tmp_path / "no-model", "--task", bad)  # the model would fail to load
    assert_user_error(p, "x.jsonl", "cannot tell the data format", "--prompt-column")


def test_small_and_empty_splits(tmp_path, zoft_here, capsys):
    one = write_jsonl(tmp_path / "one.jsonl", [{"input": "q", "output": " a"}])
    with pytest.raises(ZoftError, match="no training examples .*a fifth of its rows"):
        prepare_data(TrainConfig(task=tc(task=one)))  # its one row is held out for the test split
    # 64 rows: test and dev regions of 12 each, whatever sizes are asked; train on the other 40
    pool = write_jsonl(tmp_path / "p.jsonl", [{"input": f"q{i}", "output": f" {i}"} for i in range(64)])
    capsys.readouterr()
    _, drawn, _ = prepare_data(TrainConfig(task=tc(task=pool)))  # the defaults ask for 1000 of each
    assert [len(drawn.examples[k]) for k in ("train", "dev", "test")] == [40, 12, 12]
    err = capsys.readouterr().err
    assert "the train split has 40 examples, fewer than --n-train 1000" in err
    assert "the test split has 12 examples, fewer than --n-test 1000 (a held-out region" in err
    prepare_data(TrainConfig(task=tc(task=pool, n_train=20, n_dev=50, n_test=10), run=RunConfig(eval_every=5)))
    assert "the dev split has 12 examples, fewer than --n-dev 50" in capsys.readouterr().err
    tr = write_jsonl(tmp_path / "tr.jsonl", [{"input": f"q{i}", "output": " a"} for i in range(8)])
    cfg = TrainConfig(task=tc(train_file=tr, n_train=8, n_dev=0), run=RunConfig(eval_every=5))
    with pytest.raises(ZoftError, match="--eval-every 5 evaluates on the dev split, which came out empty"):
        prepare_data(cfg)  # no --n-dev: nothing to evaluate on
    p = zoft_here("eval", "--model", tmp_path / "no-model", "--train-file", tr)
    assert_user_error(p, "test split", "empty")
