"""Evaluation splits never hold a training example: for every built-in task and for user jsonl files,
across seeds and sizes, within one draw and between draws of different sizes (what `zoft eval` with
its own flags draws against what a run trained on). Tasks that need the hub load from small local
files in their datasets' own formats, generated here; rotten_tomatoes is the real packaged pool."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest

from zoft.tasks import TASKS, draw_splits, get_task
from zoft.tasks.base import RESERVE, example_hash, held_out

N = 60  # rows per local pool: regions of 12, big enough that every size below gets cut somewhere


def jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def superglue_row(task: str, i: int, split: str) -> dict:
    t = f"{split}{i}"
    if task == "rte":
        return {"premise": f"Premise {t}.", "hypothesis": f"Claim {t}.", "idx": i,
                "label": ["entailment", "not_entailment"][i % 2]}
    if task == "cb":
        return {"premise": f"Premise {t}.", "hypothesis": f"claim {t}", "idx": i,
                "label": ["entailment", "contradiction", "neutral"][i % 3]}
    if task == "boolq":
        return {"question": f"is {t} true", "passage": f"Passage {t}.", "idx": i, "label": bool(i % 2)}
    if task == "wsc":
        text = f"Mark{t} told Pete many lies. He was wrong."
        return {"text": text, "idx": i, "label": bool(i % 2),
                "target": {"span1_index": 0, "span1_text": f"Mark{t}", "span2_index": 5, "span2_text": "He"}}
    if task == "wic":
        s1, s2 = f"Come to my place {t}.", f"No place for {t}."
        return {"word": "place", "sentence1": s1, "sentence2": s2, "idx": i, "label": bool(i % 2),
                "start1": s1.index("place"), "end1": s1.index("place") + 5,
                "start2": s2.index("place"), "end2": s2.index("place") + 5, "version": 1.1}
    if task == "multirc":
        return {"idx": i, "version": 1.1, "passage": {"text": f"<b>Sent 1: </b>Joey {t} loved pie.<br>", "questions": [
            {"question": f"What did Joey {t} love?", "idx": 0,
             "answers": [{"text": "Pie", "idx": 0, "label": 1}, {"text": "Cake", "idx": 1, "label": 0}]}]}}
    if task == "copa":
        return {"premise": f"Premise {t}.", "choice1": f"One {t}.", "choice2": f"Two {t}.",
                "question": ["cause", "effect"][i % 2], "idx": i, "label": i % 2}
    if task == "record":
        text = f"Ann{t} met Bob{t}.\n@highlight\nBob{t} smiled"
        ents = [{"start": 0, "end": len(f"Ann{t}") - 1}, {"start": text.index("Bob"), "end": text.index("Bob") + len(f"Bob{t}") - 1}]
        ans = {"start": 0, "end": len(f"Ann{t}") - 1, "text": f"Ann{t}"}
        return {"source": "x", "idx": i, "passage": {"text": text, "entities": ents},
                "qas": [{"query": "@placeholder waved.", "answers": [ans], "idx": 0}]}
    raise KeyError(task)


def write_local(task: str, root: Path) -> Path:
    """A --data-dir for `task`, in the layout and format its loader reads."""
    d = root / task
    if task == "sst2":
        d.mkdir(parents=True)
        for name, split in (("train.tsv", "train"), ("dev.tsv", "dev")):
            (d / name).write_text("sentence\tlabel\n" + "".join(f"{split} sentence {i}\t{i % 2}\n" for i in range(N)))
    elif task == "imdb":
        for split in ("train", "test"):
            jsonl(d / f"{split}.jsonl", [{"text": f"{split} review {i}", "label": i % 2} for i in range(N)])
    elif task == "squad":
        d.mkdir(parents=True)
        for name, split in (("train-v1.1.json", "train"), ("dev-v1.1.json", "dev")):
            paras = [{"context": f"Item {split}{i} is red.", "qas": [{"id": f"{split}{i}", "question": f"Colour of {split}{i}?",
                      "answers": [{"text": "red", "answer_start": 0}]}]} for i in range(N)]
            (d / name).write_text(json.dumps({"version": "1.1", "data": [{"title": "T", "paragraphs": paras}]}))
    elif task == "drop":
        answer = {"number": "3", "date": {"day": "", "month": "", "year": ""}, "spans": []}
        for name, split in (("drop_dataset_train.json", "train"), ("drop_dataset_dev.json", "dev")):
            data = {f"{split}{i}": {"passage": f"Passage {split}{i}.", "qa_pairs": [
                {"question": "How many?", "answer": answer, "query_id": f"{split}{i}", "validated_answers": [answer]}]}
                for i in range(N)}
            (d / "drop_dataset").mkdir(parents=True, exist_ok=True)
            (d / "drop_dataset" / name).write_text(json.dumps(data))
    else:
        jsonl(d / "train.jsonl", [superglue_row(task, i, "train") for i in range(N)])
        jsonl(d / "val.jsonl", [superglue_row(task, i, "val") for i in range(N)])
    return d


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict:
    """Every built-in task, loaded offline, plus user jsonl files (multiple choice and generation)."""
    root = tmp_path_factory.mktemp("splits")
    out = {"rotten_tomatoes": get_task("rotten_tomatoes")}
    for name in TASKS:
        if name != "rotten_tomatoes":
            out[name] = get_task(name, data_dir=str(write_local(name, root)))
    mc, gen = root / "mine.jsonl", root / "gen.jsonl"
    jsonl(mc, [{"input": f"q{i}", "candidates": [" a", " b"], "answer": i % 2} for i in range(37)])
    jsonl(gen, [{"input": f"q{i}", "output": f" {i}"} for i in range(9)])
    out |= {"mine.jsonl": get_task(str(mc)), "gen.jsonl": get_task(str(gen))}
    return out


SIZES = [(0, 0, 0), (5, 3, 2), (40, 20, 20), (10**6, 10**6, 10**6)]  # (n_train, n_dev, n_test)
SEEDS = [0, 1, 7]


@pytest.mark.parametrize("name", [*TASKS, "mine.jsonl", "gen.jsonl"])
def test_no_evaluation_split_ever_holds_a_training_example(tasks, name, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # local files, never the hub
    task = tasks[name]
    draws = {(sz, seed): draw_splits(task, *sz, seed=seed) for sz in SIZES for seed in SEEDS}
    some = draws[(SIZES[-1], 0)]
    assert some.examples["train"] and some.examples["test"], name  # every pool gives a train and a test split
    trained = {(d.pools["train"], i) for d in draws.values() for i in d.indices["train"]}
    trained_content = {h for d in draws.values() for h in d.hashes["train"]}
    for (sz, seed), d in draws.items():
        for split in ("dev", "test"):
            where = {(d.pools[split], i) for i in d.indices[split]}
            # against every training draw of every size and seed, not just its own
            assert not where & trained, (name, sz, seed, split)
            assert not set(d.hashes[split]) & trained_content, (name, sz, seed, split)
        assert not {(d.pools["dev"], i) for i in d.indices["dev"]} & {(d.pools["test"], i) for i in d.indices["test"]}
        for split, n in zip(("train", "dev", "test"), sz):
            assert len(d.indices[split]) <= n and len(set(d.indices[split])) == len(d.indices[split])
    # the test split is the same whatever the seed, and a smaller one is a prefix of a larger one
    assert draws[(SIZES[2], 0)].hashes["test"] == draws[(SIZES[2], 7)].hashes["test"]
    assert draws[(SIZES[-1], 1)].hashes["test"][:2] == draws[(SIZES[1], 0)].hashes["test"]


def test_regions_and_copies_on_the_real_pool(tasks):
    """rotten_tomatoes: 10,568 snippets, two of them twice. Test and dev regions of 1000 each; no copy of a
    held-out snippet trains; the k-shot draw comes from the training region too."""
    rt = tasks["rotten_tomatoes"]
    pool = rt.load_split("train")
    assert held_out(len(pool)) == RESERVE == 1000 and held_out(10) == 2 and held_out(2) == 1 and held_out(0) == 0
    d = draw_splits(rt, 10**6, 10**6, 10**6, seed=3)
    assert len(d.indices["test"]) == 1000 and len(d.indices["dev"]) == 1000
    assert len(d.indices["train"]) + 2000 <= len(pool) and len(d.indices["train"]) >= len(pool) - 2000 - 2
    seen = {}
    for h in (example_hash(e) for e in pool):
        seen[h] = seen.get(h, 0) + 1
    assert sum(v > 1 for v in seen.values()) == 2  # the duplicates are there, and still never cross regions
    k = draw_splits(rt, 0, 50, 50, seed=0, k_shot=8)
    assert sorted(e.answer for e in k.examples["train"]) == [0] * 8 + [1] * 8
    assert not set(k.hashes["train"]) & (set(d.hashes["test"]) | set(d.hashes["dev"]))


def test_manifest_round_trip(tasks):
    """What a run records (splits.json) reads back as the same examples, and edited data is refused."""
    from zoft.errors import ZoftError
    from zoft.tasks import recorded_splits

    task = tasks["mine.jsonl"]
    d = draw_splits(task, 10, 4, 5, seed=2)
    m = json.loads(json.dumps(d.manifest(task=task.name)))
    got = recorded_splits(task, m, "splits.json")
    assert {k: [example_hash(e) for e in v] for k, v in got.items()} == d.hashes
    m["splits"]["test"]["hashes"][0] = "0" * 16
    with pytest.raises(ZoftError, match="data changed since the run"):
        recorded_splits(task, m, "splits.json")
    assert list(itertools.chain(*d.indices.values()))  # (the draw was not empty)


def test_your_own_splits_are_used_as_given_and_recorded(tmp_path):
    """--train-file/--validation-file/--test-file: the user's splits, as given (a training row that repeats a
    test row is counted, not dropped), recorded and read back; without a validation file, dev is a region
    zoft cuts from the train file, which never trains."""
    from zoft.config import TaskConfig
    from zoft.tasks import load_task, recorded_splits

    def rows(tag: str, n: int) -> list[dict]:
        return [{"text": f"{tag} {i}", "label": i % 2} for i in range(n)]

    for name, part in (("tr", rows("tr", 30) + rows("te", 2)), ("va", rows("va", 9)), ("te", rows("te", 7))):
        jsonl(tmp_path / f"{name}.jsonl", part)
    files = {k: str(tmp_path / f"{v}.jsonl") for k, v in (("train_file", "tr"), ("validation_file", "va"),
                                                           ("test_file", "te"))}
    task = load_task(TaskConfig(**files, label_names=["n", "y"]))
    d = draw_splits(task, 100, 100, 100, seed=1)
    assert d.pools == {"train": "train", "dev": "dev", "test": "test"}
    assert [len(d.indices[k]) for k in ("train", "dev", "test")] == [32, 9, 7] and d.repeated == 2
    got = recorded_splits(task, json.loads(json.dumps(d.manifest())), "splits.json")
    assert got == d.examples
    no_dev = load_task(TaskConfig(train_file=files["train_file"], test_file=files["test_file"], label_names=["n", "y"]))
    for seed in SEEDS:
        e = draw_splits(no_dev, 100, 100, 100, seed=seed)
        assert e.pools["dev"] == "train" and len(e.indices["dev"]) == held_out(32)
        assert not set(e.indices["dev"]) & set(e.indices["train"]) and len(e.indices["train"]) == 32 - held_out(32)
        assert not set(e.hashes["dev"]) & set(draw_splits(no_dev, 100, 0, 0, seed=seed + 1).hashes["train"])
