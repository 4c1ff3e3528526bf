"""Tests for MeZO's task suite: each task from a tiny fixture in its dataset's own format, the hub path (a fake
`datasets`), the BIG-bench cache, the answer metrics against hand-computed values, and the error messages."""

import io
import json
import sys
import tarfile
import types

import pytest

from tests.helpers_tok import gpt2_tokenizer
from zoft.errors import ZoftError
from zoft.tasks import TASKS, describe_tasks, encode, get_task, sample_splits
from zoft.tasks import bigbench as bb
from zoft.tasks.metrics import exact_match, f1, normalize_answer, qa_scores, token_f1
from zoft.tasks.qa import GenExample

SUITE = ["rte", "cb", "boolq", "wsc", "wic", "multirc", "copa", "record", "squad", "drop"]


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No `datasets` (import fails, nothing reaches the network) and an empty cache, unless a test says otherwise."""
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setenv("ZOFT_CACHE", str(tmp_path_factory.mktemp("cache")))


def jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def load(name, tmp_path, train, test=None, folder=""):
    """Write train.jsonl / val.jsonl (SuperGLUE zip layout, optionally in `folder`) and load both splits."""
    jsonl(tmp_path / folder / "train.jsonl", train)
    jsonl(tmp_path / folder / "val.jsonl", test if test is not None else train)
    task = get_task(name, data_dir=str(tmp_path))
    assert task.source == "local" and not task.single_pool
    return task.load_split("train"), task.load_split("test")


def triple(ex) -> tuple:
    return ex.prompt, ex.candidates, ex.answer


# ---- SuperGLUE, from the official zips' .jsonl files ----

RTE_ROW = {
    "premise": "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.",
    "hypothesis": "Christopher Reeve had an accident.",
    "idx": 0,
    "label": "not_entailment",
}


def test_rte(tmp_path):
    train, test = load("rte", tmp_path, [RTE_ROW, {**RTE_ROW, "label": "entailment"}], folder="RTE")
    assert triple(train[0]) == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44.\n"
        'Does this mean that "Christopher Reeve had an accident." is true? Yes or No?\n',
        ["Yes", "No"],
        1,
    )
    assert train[1].answer == 0 and train[0].kind == "mc" and len(test) == 2


def test_cb(tmp_path):
    row = {
        "premise": "It was a complex language. Not written down but handed down.",
        "hypothesis": "the language was peeled down",
        "label": "contradiction",
        "idx": 0,
    }
    train, _ = load("cb", tmp_path, [row, {**row, "label": "neutral"}, {**row, "label": "entailment"}])
    assert triple(train[0]) == (
        "Suppose It was a complex language. Not written down but handed down. "
        'Can we infer that "the language was peeled down"? Yes, No, or Maybe?\n',
        ["Yes", "No", "Maybe"],
        1,
    )
    assert [e.answer for e in train] == [1, 2, 0]


def test_boolq_superglue_and_google_files(tmp_path):
    row = {
        "question": "do iran and afghanistan speak the same language",
        "passage": "Persian language -- Persian is spoken in Iran and Afghanistan.",
        "idx": 0,
        "label": True,
    }
    train, _ = load("boolq", tmp_path / "sg", [row, {**row, "label": False}])
    assert triple(train[0]) == (
        "Persian language -- Persian is spoken in Iran and Afghanistan. "
        "Do iran and afghanistan speak the same language?\n",
        ["Yes", "No"],
        0,
    )
    assert train[1].answer == 1
    # Google's BoolQ files: train.jsonl / dev.jsonl, "answer" instead of "label", passage without the title
    g = tmp_path / "google"
    jsonl(
        g / "train.jsonl",
        [{"question": "is a skyrim online?", "title": "T", "answer": False, "passage": "P."}],
    )
    jsonl(g / "dev.jsonl", [{"question": "is it?", "title": "T", "answer": True, "passage": "Q."}])
    task = get_task("boolq", data_dir=str(g))
    assert triple(task.load_split("train")[0]) == ("P. Is a skyrim online?\n", ["Yes", "No"], 1)
    assert task.load_split("test")[0].prompt == "Q. Is it?\n"


def test_wsc_with_wsc_fixed_span_repair(tmp_path):
    row = {
        "text": "Mark told Pete many lies about himself, which Pete included in his book. He should have been "
        "more truthful.",
        "target": {"span2_index": 13, "span1_index": 0, "span1_text": "Mark", "span2_text": "He"},
        "idx": 0,
        "label": True,
    }
    broken = {  # span1_text is not a substring: the hub's wsc.fixed lower-cases it and drops the "."
        "text": "I put the cake away in the refrigerator. It has a lot of butter in it.",
        "target": {"span1_index": 2, "span1_text": "The cake.", "span2_index": 8, "span2_text": "It"},
        "idx": 1,
        "label": False,
    }
    train, _ = load("wsc", tmp_path, [row, broken], folder="WSC")
    assert triple(train[0]) == (
        row["text"] + '\nIn the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n',
        ["No", "Yes"],
        1,
    )
    assert train[1].prompt.endswith('does the pronoun "it" refer to the cake? Yes or No?\n')
    assert train[1].answer == 0


def test_wic(tmp_path):
    row = {
        "word": "place",
        "sentence1": "Do you want to come over to my place later?",
        "sentence2": "A political system with no place for the less prominent groups.",
        "idx": 0,
        "label": False,
        "start1": 31,
        "start2": 27,
        "end1": 36,
        "end2": 32,
        "version": 1.1,
    }
    train, _ = load("wic", tmp_path, [row])
    assert triple(train[0]) == (
        'Does the word "place" have the same meaning in these two sentences? Yes, No?\n'
        "Do you want to come over to my place later?\n"
        "A political system with no place for the less prominent groups.\n",
        ["No", "Yes"],
        0,
    )


MULTIRC_ROW = {
    "idx": 0,
    "version": 1.1,
    "passage": {
        "text": "<b>Sent 1: </b>Joey loved pie.<br><b>Sent 2: </b>He ate it daily.<br>",
        "questions": [
            {
                "question": "What did Joey love?",
                "answers": [{"text": "Pie", "idx": 0, "label": 1}, {"text": "Cake", "idx": 1, "label": 0}],
                "idx": 0,
            }
        ],
    },
}


def test_multirc(tmp_path):
    train, _ = load("multirc", tmp_path, [MULTIRC_ROW], folder="MultiRC")
    assert [triple(e) for e in train] == [
        (
            "<b>Sent 1: </b>Joey loved pie.<br><b>Sent 2: </b>He ate it daily.<br>\nQuestion: What did Joey love?\n"
            f'I found this answer "{text}". Is that correct? Yes or No?\n',
            ["No", "Yes"],
            label,
        )
        for text, label in [("Pie", 1), ("Cake", 0)]
    ]


def test_copa(tmp_path):
    rows = [
        {
            "premise": "My body cast a shadow over the grass.",
            "choice1": "The sun was rising.",
            "choice2": "The grass was cut.",
            "question": "cause",
            "idx": 0,
            "label": 0,
        },
        {
            "premise": "I tipped the bottle. ",
            "choice1": "The liquid froze.",
            "choice2": "I spilled it.",
            "question": "effect",
            "idx": 1,
            "label": 1,
        },
    ]
    train, _ = load("copa", tmp_path, rows, folder="COPA")
    assert triple(train[0]) == (
        "My body cast a shadow over the grass because",
        [" the sun was rising.", " the grass was cut."],
        0,
    )
    assert triple(train[1]) == ("I tipped the bottle so", [" the liquid froze.", " I spilled it."], 1)


def test_record(tmp_path):
    text = "Tracy Morgan sued Walmart.\n@highlight\nMorgan was hurt\n@highlight\nWalmart apologized"

    def span(s, start=0):
        i = text.index(s, start)
        return {"start": i, "end": i + len(s) - 1, "text": s}  # end is inclusive in ReCoRD

    ents = [span("Tracy Morgan"), span("Walmart"), span("Morgan", 12), span("Walmart", 30)]
    qas = [
        {"query": "@placeholder said the driver was at fault.", "answers": [span("Walmart")], "idx": 0},
        {
            "query": "@placeholder was in the truck.",
            "answers": [span("Tracy Morgan"), span("Morgan", 12)],
            "idx": 1,
        },
        {"query": "@placeholder drove.", "answers": [{"start": 0, "end": 3, "text": "Nobody"}], "idx": 2},
    ]
    entities = [{"start": e["start"], "end": e["end"]} for e in ents]
    row = {"source": "Daily mail", "passage": {"text": text, "entities": entities}, "qas": qas, "idx": 0}
    train, _ = load("record", tmp_path, [row], folder="ReCoRD")
    assert len(train) == 2  # the third query's answer is no entity: skipped
    prompt = "Tracy Morgan sued Walmart.\n- Morgan was hurt\n- Walmart apologized\n-"
    ents_sorted = ["Morgan", "Tracy Morgan", "Walmart"]
    assert triple(train[0]) == (prompt, [f" {e} said the driver was at fault." for e in ents_sorted], 2)
    assert train[0].golds == [2]
    assert train[1].answer == 0 and train[1].golds == [0, 1]


# ---- SQuAD and DROP (generation), from their own JSON files ----

SQUAD = {
    "version": "1.1",
    "data": [
        {
            "title": "Super_Bowl_50",
            "paragraphs": [
                {
                    "context": "Super Bowl 50 was won by the Denver Broncos.",
                    "qas": [
                        {
                            "id": "a1",
                            "question": "Who won Super Bowl 50? ",
                            "answers": [
                                {"text": "Denver Broncos", "answer_start": 29},
                                {"text": "the Denver Broncos", "answer_start": 25},
                            ],
                        }
                    ],
                }
            ],
        }
    ],
}
SQUAD_PROMPT = (
    "Title: Super_Bowl_50\nContext: Super Bowl 50 was won by the Denver Broncos.\n"
    "Question: Who won Super Bowl 50?\nAnswer:"
)


def test_squad(tmp_path):
    (tmp_path / "train-v1.1.json").write_text(json.dumps(SQUAD))
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(SQUAD))
    task = get_task("squad", data_dir=str(tmp_path))
    [ex] = task.load_split("test")
    assert isinstance(ex, GenExample) and ex.kind == "gen" and task.kind == "gen"
    assert triple(ex) == (SQUAD_PROMPT, [" Denver Broncos\n"], 0)  # MeZO's target ends with "\n"
    assert ex.answers == ["Denver Broncos", "the Denver Broncos"]


def _drop_answer(number="", date=("", "", ""), spans=()):
    return {"number": number, "date": dict(zip(("day", "month", "year"), date)), "spans": list(spans)}


def test_drop_answers_as_the_hub_builds_them(tmp_path):
    train = {
        "nfl_1": {
            "passage": "The Lions kicked 3 field goals.",
            "qa_pairs": [
                {"question": " How many field goals? ", "answer": _drop_answer("3"), "query_id": "q1",
                 "validated_answers": [_drop_answer("4")]},
            ],
        }
    }  # fmt: skip
    dev = {
        "history_1": {
            "passage": "It began on 9 March 2021.",
            "qa_pairs": [
                {"question": "When?", "answer": _drop_answer("1"), "query_id": "q2",
                 "validated_answers": [_drop_answer(date=("9", "March", "2021")), _drop_answer(spans=["March 9", "2021"])]},
                {"question": "Bad?", "answer": _drop_answer("1"), "query_id": "q3",  # number and date: hub skips it
                 "validated_answers": [_drop_answer("1", date=("", "", "2000"))]},
            ],
        }
    }  # fmt: skip
    d = tmp_path / "drop_dataset"
    d.mkdir()
    (d / "drop_dataset_train.json").write_text(json.dumps(train))
    (d / "drop_dataset_dev.json").write_text(json.dumps(dev))
    task = get_task("drop", data_dir=str(tmp_path))
    [tr] = task.load_split("train")
    assert triple(tr) == (
        "Passage: The Lions kicked 3 field goals.\nQuestion: How many field goals?\nAnswer:",
        [" 3\n"],
        0,
    )
    assert tr.answers == ["3"]  # train: "answer" only, as on the hub
    [te] = task.load_split("test")
    assert te.candidates == [" 9 March 2021\n"] and te.answers == ["9 March 2021", "March 9", "2021"]


# ---- the hub path, with a fake `datasets` ----


def test_hub_rows_match_local_files(monkeypatch, tmp_path):
    hub = {
        ("super_glue", "rte"): [{**RTE_ROW, "label": 1}],
        ("boolq", None): [{"question": "is it", "passage": "P.", "answer": True}],
        ("squad", None): [
            {"title": "Super_Bowl_50", "context": "Super Bowl 50 was won by the Denver Broncos.",
             "question": "Who won Super Bowl 50? ", "id": "a1",
             "answers": {"text": ["Denver Broncos", "the Denver Broncos"], "answer_start": [29, 25]}}
        ],
        ("drop", None): [
            {"passage": "P", "question": "Q?", "section_id": "s", "query_id": "q",
             "answers_spans": {"spans": ["3", "three"], "types": ["number", "span"]}}
        ],
    }  # fmt: skip
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return hub[(name, config)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rte = get_task("rte")
    assert rte.source == "hub" and triple(rte.load_split("test")[0])[1:] == (["Yes", "No"], 1)
    assert calls == [("super_glue", "rte", "validation")]
    assert triple(get_task("boolq").load_split("train")[0]) == ("P. Is it?\n", ["Yes", "No"], 0)
    sq = get_task("squad").load_split("train")[0]
    assert triple(sq) == (SQUAD_PROMPT, [" Denver Broncos\n"], 0) and len(sq.answers) == 2
    dr = get_task("drop").load_split("train")[0]
    assert dr.candidates == [" 3\n"] and dr.answers == ["3", "three"]

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=unreachable))
    with pytest.raises(ZoftError, match=r"--data-dir.*hub error: ConnectionError: no route to host"):
        get_task("cb").load_split("train")


# ---- the BIG-bench cache ----


def write_bigbench_layout(root) -> None:
    """Tiny files in the layout fetch_bigbench extracts (paths under benchmark_tasks/)."""
    files = {
        "squad": SQUAD,
        "drop": {
            "examples": [
                {"input": "Passage: The Lions kicked 3 field goals. \nQuestion: How many field goals? \nAnswer type: Number ",
                 "target": ["3."]},
                {"input": "Passage: P. \nQuestion: When? \nAnswer type: Date ",
                 "target": ["{'day': '', 'month': 'May', 'year': '1990'}."]},
                {"input": "Passage: P. \nQuestion: Who? \nAnswer type: Span ", "target": ["['Lions', 'Bears']."]},
            ]
        },
        "multirc": {
            "examples": [
                {"input": "Paragraph- Sent 1: Joey loved pie.Sent 2: He ate it daily. \nQuestion: What did Joey "
                 "love? (A) Pie (B) Cake (C) Pie (A) slice.", "target": ["A, C."]}
            ]
        },
    }  # fmt: skip
    for task, data in files.items():
        path = root / bb.FILES[task]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))


def test_bigbench_cache_is_a_single_pool(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOFT_CACHE", str(tmp_path))
    write_bigbench_layout(tmp_path / "bigbench")
    squad = get_task("squad")
    assert squad.source == "bigbench" and squad.single_pool
    assert triple(squad.load_split("train")[0]) == (SQUAD_PROMPT, [" Denver Broncos\n"], 0)
    with pytest.raises(ZoftError, match="single pool"):
        squad.load_split("test")
    s = sample_splits(squad, n_train=5, n_dev=5, n_test=1)
    assert len(s["test"]) == 1 and s["train"] == []

    drop = get_task("drop").load_split("train")
    assert triple(drop[0]) == (
        "Passage: The Lions kicked 3 field goals.\nQuestion: How many field goals?\nAnswer:",
        [" 3\n"],
        0,
    )
    assert [e.answers for e in drop] == [["3"], ["May 1990"], ["Lions", "Bears"]]

    mrc = get_task("multirc").load_split("train")
    assert [(e.prompt.split('"')[1], e.answer) for e in mrc] == [
        ("Pie", 1),
        ("Cake", 0),
        ("Pie (A) slice", 1),
    ]
    assert mrc[0].prompt == (
        "Sent 1: Joey loved pie.Sent 2: He ate it daily.\nQuestion: What did Joey love?\n"
        'I found this answer "Pie". Is that correct? Yes or No?\n'
    )
    # --data-dir pointing at a cache folder picks it explicitly, even with `datasets` importable
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=None))
    assert get_task("drop", data_dir=str(tmp_path / "bigbench")).source == "bigbench"
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    assert get_task("drop").source == "hub"
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # offline (datasets is now a dependency): the fetched copy
    assert get_task("drop").source == "bigbench"
    assert next(r for r in describe_tasks() if r[0] == "squad")[3] is True


def fake_sdist(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(bb.SDIST_PREFIX + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_fetch_bigbench_extracts_only_the_needed_files(tmp_path):
    archive = tmp_path / "bigbench-1.0.0.tar.gz"
    members = {rel: json.dumps({"task": t}).encode() for t, rel in bb.FILES.items()}
    fake_sdist(archive, {**members, "other_task/task.json": b"{}"})
    with pytest.raises(ZoftError, match="sha256"):
        bb.fetch_bigbench(str(tmp_path / "c"), archive=str(archive))  # the pinned hash is the real sdist's
    root = bb.fetch_bigbench(str(tmp_path / "c"), archive=str(archive), sha256=None)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == sorted(
        bb.FILES.values()
    )
    assert json.loads((root / bb.FILES["drop"]).read_text()) == {"task": "drop"}
    assert bb.fetch_bigbench(str(root), archive="/nonexistent") == root  # all there: nothing to do
    fake_sdist(archive, {bb.FILES["squad"]: b"{}"})
    with pytest.raises(ZoftError, match="has no"):
        bb.fetch_bigbench(str(tmp_path / "d"), archive=str(archive), sha256=None)


def test_fetch_bigbench_says_what_to_do_when_pypi_no_longer_serves_the_sdist(tmp_path, monkeypatch, capsys):
    """Since 2026-12 files.pythonhosted.org answers 403 for bigbench 1.0.0: one clear line, naming --archive."""
    import urllib.error

    def refuse(url, timeout=None):
        raise urllib.error.HTTPError(url, 403, "Forbidden", {}, None)

    monkeypatch.setattr(bb.urllib.request, "urlopen", refuse)
    with pytest.raises(ZoftError, match=r"no longer served \(HTTP 403.*--archive PATH"):
        bb.fetch_bigbench(str(tmp_path / "c"))
    from zoft.cli import main

    monkeypatch.setenv("ZOFT_CACHE", str(tmp_path / "cache"))
    for argv, says in [([], "no longer served"), (["--archive", str(tmp_path / "missing.tar.gz")], "no such file")]:
        with pytest.raises(SystemExit) as e:
            main(["tasks", "--fetch-bigbench", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("zoft: error:") == 1 and says in err, err
    with pytest.raises(SystemExit):
        main(["tasks", "--archive", str(tmp_path / "x.tar.gz")])
    assert "add --fetch-bigbench" in capsys.readouterr().err


# ---- metrics ----


def test_metrics_against_hand_values():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("An apple, a day.") == "apple day"
    assert token_f1("the Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)  # P 2/3, R 1
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)  # counts with multiplicity: 2 in common
    assert f1("Broncos", ["Denver Broncos", "Carolina Panthers"]) == pytest.approx(2 / 3)  # P 1, R 1/2
    # max over gold answers
    assert f1("Panthers", ["Denver Broncos", "the Carolina Panthers"]) == pytest.approx(2 / 3)
    assert f1("the", ["a"]) == 0.0 and f1("x", []) == 0.0  # both empty after normalization: 0 (SQuAD v1.1)
    assert exact_match("the broncos.", ["Denver", "Broncos"]) == 1.0
    assert exact_match("Denver", ["Denver Broncos"]) == 0.0
    assert qa_scores(["Denver Broncos", "x", "Broncos"], [["Denver Broncos"], ["y"], ["Denver Broncos"]]) == {
        "em": pytest.approx(1 / 3),
        "f1": pytest.approx((1 + 0 + 2 / 3) / 3),
    }


# ---- registry, encoding, errors ----


def test_describe_tasks_lists_every_task():
    rows = describe_tasks()
    assert [r[0] for r in rows] == list(TASKS) and set(SUITE) <= set(TASKS)
    for _, kind, source, reachable, note in rows:
        assert kind in ("mc", "gen") and source and isinstance(reachable, bool) and isinstance(note, str)
    by_name = {r[0]: r for r in rows}
    assert by_name["rotten_tomatoes"][3] is True
    assert not any(by_name[n][3] for n in SUITE)  # no `datasets`, empty cache
    assert by_name["squad"][1] == "gen" and "BIG-bench" in by_name["drop"][2]


def test_suite_examples_encode(tmp_path):
    train, _ = load("copa", tmp_path / "copa", [{"premise": "A.", "choice1": "B.", "choice2": "C.", "question": "cause", "label": 1}])  # fmt: skip
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(SQUAD))
    (tmp_path / "train-v1.1.json").write_text(json.dumps(SQUAD))
    gen = get_task("squad", data_dir=str(tmp_path)).load_split("train")
    tok = gpt2_tokenizer()
    enc, n_trunc = encode(tok, train + gen, max_length=None)
    assert n_trunc == 0 and [tok.decode(c) for c in enc[0].cand_ids] == [" b.", " c."]
    assert tok.decode(enc[0].prompt_ids) == "<|endoftext|>A because"
    assert enc[1].kind == "gen" and enc[1].cand_ids[0][-1] == 198  # the target ends with "\n" (GPT-2 id 198)


@pytest.mark.parametrize("name", SUITE)
def test_without_hub_or_files_says_what_to_pass(name):
    with pytest.raises(ZoftError, match=r"pip install datasets.*--data-dir") as e:
        get_task(name).load_split("train")
    if name in bb.FILES:
        assert "--fetch-bigbench" in str(e.value)


def test_bad_rows_name_file_line_and_field(tmp_path):
    with pytest.raises(ZoftError, match=r"train.jsonl:2: field 'label' must be one of"):
        load("rte", tmp_path / "a", [RTE_ROW, {**RTE_ROW, "label": "maybe"}])
    with pytest.raises(ZoftError, match=r"train.jsonl:1: bad or missing field \(KeyError: 'hypothesis'\)"):
        load("cb", tmp_path / "b", [{"premise": "p", "label": "neutral"}])
    with pytest.raises(ZoftError, match=r"no train.jsonl"):
        get_task("wic", data_dir=str(tmp_path)).load_split("train")
    with pytest.raises(ZoftError, match="not a folder"):
        get_task("wic", data_dir=str(tmp_path / "missing"))
    with pytest.raises(ZoftError, match="MeZO's template"):
        get_task("rte", template="{premise}")
