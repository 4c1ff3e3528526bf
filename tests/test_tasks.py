"""Tests for zoft.tasks: built-in loaders, jsonl parsing and its errors, seeded sampling, tokenization."""

import json
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers_tok import EOT_ID, gpt2_tokenizer
from zoft.errors import ZoftError
from zoft.tasks import TASKS, Example, JsonlTask, Task, encode, get_task, sample_splits


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def rt():
    return get_task("rotten_tomatoes")


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def key(ex: Example) -> tuple:
    return (ex.prompt, tuple(ex.candidates), ex.answer)


# ---- built-in tasks ----


def test_rotten_tomatoes_pool(rt):
    pool = rt.load_split("train")
    assert len(pool) == 10568 and rt.kind == "mc" and rt.single_pool
    labels = [ex.answer for ex in pool]
    assert set(labels) == {0, 1} and 5000 < sum(labels) < 5600
    ex = pool[2]  # "Effective but too tepid biopic", mean score -0.6
    assert ex.prompt == "Effective but too tepid biopic It was"
    assert ex.candidates == [" terrible", " great"] and ex.answer == 0
    assert all(ex.prompt.endswith(" It was") and not ex.prompt.startswith(" ") for ex in pool)


def test_registry_and_suggestion():
    assert set(TASKS) >= {"rotten_tomatoes", "sst2", "imdb"}
    with pytest.raises(ZoftError, match="did you mean rotten_tomatoes"):
        get_task("rotten_tomatos")
    with pytest.raises(ZoftError, match="known tasks"):
        get_task("zzz")
    with pytest.raises(ZoftError, match="does not exist"):
        get_task("nope/missing.jsonl")


def test_sst2_local_tsv(tmp_path):
    (tmp_path / "train.tsv").write_text(
        "sentence\tlabel\nhide new secretions \t0\n\ncharming and moving \t1\n"
    )
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nit 's a charming journey . \t1\n")
    task = get_task("sst2", data_dir=str(tmp_path))
    train, test = task.load_split("train"), task.load_split("test")
    assert [(e.prompt, e.answer) for e in train] == [
        ("hide new secretions It was", 0),
        ("charming and moving It was", 1),
    ]
    assert test[0].prompt == "it 's a charming journey . It was" and test[0].candidates == [
        " terrible",
        " great",
    ]
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nfine\t7\n")
    with pytest.raises(ZoftError, match=r"dev.tsv:2: field 'label'"):
        task.load_split("test")


def test_sst2_without_hub_or_files(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails: no network attempted
    with pytest.raises(ZoftError, match="offline, use --task rotten_tomatoes"):
        get_task("sst2").load_split("train")


def test_imdb_jsonl_and_folders(tmp_path):
    jdir = tmp_path / "j"
    jdir.mkdir()
    write_jsonl(jdir / "train.jsonl", [{"text": "Great.<br /><br />Loved it", "label": 1}])
    write_jsonl(jdir / "test.jsonl", [{"text": "Awful", "label": 0}])
    task = get_task("imdb", data_dir=str(jdir))
    assert [(e.prompt, e.answer) for e in task.load_split("train")] == [("Great. Loved it It was", 1)]
    assert task.load_split("test")[0].answer == 0

    for split, label, name, text in [
        ("train", "pos", "1_9.txt", "Yes<br/>yes"),
        ("train", "neg", "2_1.txt", "No"),
    ]:
        d = tmp_path / "aclImdb" / split / label
        d.mkdir(parents=True)
        (d / name).write_text(text)
    train = get_task("imdb", data_dir=str(tmp_path)).load_split("train")
    assert sorted((e.prompt, e.answer) for e in train) == [("No It was", 0), ("Yes yes It was", 1)]
    with pytest.raises(ZoftError, match="aclImdb"):
        get_task("imdb", data_dir=str(tmp_path)).load_split("test")


# ---- sampling ----


def test_sample_splits_deterministic_and_disjoint(rt):
    a = sample_splits(rt, n_train=200, n_dev=100, n_test=300, seed=1)
    b = sample_splits(rt, n_train=200, n_dev=100, n_test=300, seed=1)
    c = sample_splits(rt, n_train=200, n_dev=100, n_test=300, seed=2)
    assert {k: len(v) for k, v in a.items()} == {"train": 200, "dev": 100, "test": 300}
    assert a == b
    assert a["test"] == c["test"]  # held-out set independent of the training seed
    assert a["train"] != c["train"]
    for s in (a, c):
        tr, dv, te = ({key(e) for e in s[k]} for k in ("train", "dev", "test"))
        assert len(tr) == 200 and not (tr & dv) and not (tr & te) and not (dv & te)
    # a smaller test set is a prefix of a larger one: n_test doesn't reshuffle
    assert sample_splits(rt, 0, 0, 100, seed=5)["test"] == a["test"][:100]


def test_sample_splits_sizes_beyond_pool_and_zero(rt):
    """Sizes beyond a region give what the region holds: one pool keeps 1000 for test and 1000 for dev
    (a fifth of a smaller pool), whatever is asked, and trains on the rest."""
    s = sample_splits(rt, n_train=10**6, n_dev=10, n_test=0, seed=0)
    assert len(s["train"]) == 10568 - 2000 and len(s["dev"]) == 10 and s["test"] == []
    s = sample_splits(rt, n_train=0, n_dev=10**6, n_test=10568 - 5, seed=0)
    assert len(s["test"]) == 1000 and len(s["dev"]) == 1000 and s["train"] == []
    with pytest.raises(ZoftError, match="n_dev"):
        sample_splits(rt, n_dev=-1)


class TwoPool(Task):
    name, kind = "toy", "mc"

    def load_split(self, split):
        n = 100 if split == "train" else 30
        return [Example(f"{split} {i}", ["a", "b", "c"], i % 3) for i in range(n)]


def test_two_pool_sampling_and_k_shot():
    s = sample_splits(TwoPool(), n_train=10, n_dev=5, n_test=1000, seed=3)
    assert all(e.prompt.startswith("train") for e in s["train"] + s["dev"])
    assert len(s["test"]) == 30 and all(e.prompt.startswith("test") for e in s["test"])
    assert s["test"] == sample_splits(TwoPool(), seed=4)["test"]
    k = sample_splits(TwoPool(), n_train=999, n_dev=20, n_test=0, seed=3, k_shot=4)
    assert sorted(e.answer for e in k["train"]) == [0] * 4 + [1] * 4 + [2] * 4
    assert len(k["dev"]) == 20 and not ({key(e) for e in k["train"]} & {key(e) for e in k["dev"]})


def test_k_shot_rotten_tomatoes(rt):
    s = sample_splits(rt, n_test=1000, seed=0, k_shot=16)
    assert sorted(e.answer for e in s["train"]) == [0] * 16 + [1] * 16
    assert s["test"] == sample_splits(rt, seed=9)["test"]


# ---- jsonl ----


def test_jsonl_mc_and_gen(tmp_path):
    mc = write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"input": "Q1", "candidates": [" a", " b"], "answer": 1},
            "",
            {"input": "Q2", "candidates": [" x"], "answer": 0},
        ],
    )
    task = get_task(mc)
    assert isinstance(task, JsonlTask) and task.kind == "mc" and task.single_pool
    assert task.load_split("train") == [Example("Q1", [" a", " b"], 1), Example("Q2", [" x"], 0)]
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"input": "2+2=", "output": " 4", "extra": 1}])
    task = get_task(gen, template="Q: {input} A:")
    assert task.kind == "gen" and task.load_split("train") == [Example("Q: 2+2= A:", [" 4"], 0, "gen")]
    assert len(sample_splits(task, n_train=5, n_dev=5, n_test=5)["test"]) == 1


def test_jsonl_template_over_fields(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "fun", "candidates": [" no", " yes"], "answer": 1}])
    assert get_task(path, template="{text} It was").load_split("train")[0].prompt == "fun It was"
    with pytest.raises(
        ZoftError, match=r"t\.jsonl:1: .*needs field 'review'.*'answer', 'candidates', 'text'"
    ):
        get_task(path, template="{review} It was")
    with pytest.raises(ZoftError, match=r"t\.jsonl:1: field 'input'"):
        get_task(path)  # no template: 'input' is required


BAD_ROWS = {
    "json": ('{"input": "a", "output": ', "invalid JSON"),
    "not_object": ("[1, 2]", "JSON object"),
    "neither": ('{"input": "a"}', "neither"),
    "both": ('{"input": "a", "output": "b", "candidates": ["c"], "answer": 0}', "both"),
    "input_type": ('{"input": 3, "output": "b"}', "'input'"),
    "output_empty": ('{"input": "a", "output": ""}', "'output'"),
    "cands_empty": ('{"input": "a", "candidates": [], "answer": 0}', "'candidates'"),
    "cands_type": ('{"input": "a", "candidates": "ab", "answer": 0}', "'candidates'"),
    "cand_not_str": ('{"input": "a", "candidates": ["x", 1], "answer": 0}', "'candidates'"),
    "answer_str": ('{"input": "a", "candidates": ["x"], "answer": "0"}', "'answer'"),
    "answer_bool": ('{"input": "a", "candidates": ["x", "y"], "answer": true}', "'answer'"),
    "answer_range": ('{"input": "a", "candidates": ["x", "y"], "answer": 2}', "'answer'"),
    "answer_missing": ('{"input": "a", "candidates": ["x", "y"]}', "'answer'"),
    "mixed": ('{"input": "a", "output": "b"}', "one kind per file"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_jsonl_errors_name_file_line_field(tmp_path, case):
    line, needle = BAD_ROWS[case]
    good = json.dumps({"input": "q", "candidates": ["x", "y"], "answer": 0})
    path = write_jsonl(tmp_path / "data.jsonl", [good, "", line, good])
    with pytest.raises(ZoftError) as e:
        get_task(path)
    msg = str(e.value)
    assert "data.jsonl:3:" in msg and needle in msg and "\n" not in msg


def test_jsonl_file_errors(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ZoftError, match="empty.jsonl has no rows"):
        get_task(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bin.jsonl").write_bytes(b'{"input": "\xff", "output": "b"}\n')
    with pytest.raises(ZoftError, match=r"bin.jsonl:1: not UTF-8"):
        get_task(str(tmp_path / "bin.jsonl"))
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(ZoftError, match="cannot read"):
        get_task(str(tmp_path / "dir.jsonl"))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["input", "output", "candidates", "answer", "x"]), children, max_size=5
        )
    ),
    max_leaves=8,
)
garbage_line = st.text(max_size=40) | json_values.map(json.dumps)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(garbage_line, min_size=1, max_size=4))
def test_jsonl_garbage_gives_zofterror_only(tmp_path, lines):
    path = tmp_path / "g.jsonl"
    path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
    try:
        task = JsonlTask(str(path))
    except ZoftError as e:
        assert "g.jsonl" in str(e)
        return
    for ex in task.load_split("train"):  # whatever parsed must be well formed
        assert isinstance(ex.prompt, str) and ex.candidates and all(isinstance(c, str) for c in ex.candidates)
        assert 0 <= ex.answer < len(ex.candidates) and ex.kind == task.kind


# ---- encode ----


def test_encode_special_tokens_on_prompt_only(tok):
    ex = Example("the movie rocks It was", [" terrible", " great"], 1)
    (enc,), n_trunc = encode(tok, [ex], max_length=None)
    assert n_trunc == 0 and enc.answer == 1 and enc.kind == "mc"
    assert enc.prompt_ids == [EOT_ID] + tok("the movie rocks It was", add_special_tokens=False)["input_ids"]
    assert enc.prompt_ids[1:] == [1169, 3807, 12586, 632, 373]  # pinned GPT-2 BPE ids
    assert enc.cand_ids == [[7818], [1049]]  # " terrible", " great": one token each, no BOS
    assert tok.decode(enc.prompt_ids[1:] + enc.cand_ids[1]) == "the movie rocks It was great"


def test_encode_left_truncation_keeps_bos(tok):
    long = Example(" ".join(f"w{i}" for i in range(50)) + " It was", [" terrible", " great"], 0)
    short = Example("ok It was", [" terrible", " great"], 1)
    full, _ = encode(tok, [long], max_length=None)
    (a, b), n_trunc = encode(tok, [long, short], max_length=16)
    assert n_trunc == 1
    assert len(a.prompt_ids) + 1 == 16 and a.prompt_ids[0] == EOT_ID
    assert a.prompt_ids[1:] == full[0].prompt_ids[-14:]  # the end of the prompt survives
    assert b.prompt_ids == [EOT_ID] + tok("ok It was", add_special_tokens=False)["input_ids"]
    with pytest.raises(
        ZoftError, match=r"over --max-length 16; pass --truncation left or a larger --max-length"
    ):
        encode(tok, [short, long], max_length=16, truncation="error")
    with pytest.raises(ZoftError, match="leaves no room"):
        encode(tok, [Example("hi", [" a b c d"], 0, "gen")], max_length=4)


def test_encode_without_bos_tokenizer():
    tok = gpt2_tokenizer()
    tok.backend_tokenizer.post_processor = None  # plain GPT-2: no BOS added, nothing to keep
    (enc,), n = encode(tok, [Example("a b c d e f", [" g h"], 0)], max_length=5)
    assert n == 1 and tok.decode(enc.prompt_ids) == " d e f"


def test_encode_errors(tok):
    with pytest.raises(ZoftError, match=r"example 1: candidate ''"):
        encode(tok, [Example("a", [" b"], 0), Example("a", [" b", ""], 0)], max_length=None)
    with pytest.raises(ZoftError, match="example 0: prompt"):
        encode(tok, [Example("", [" b"], 0)], max_length=None)
    with pytest.raises(ZoftError, match="truncation"):
        encode(tok, [], max_length=8, truncation="right")
    assert encode(tok, [], max_length=8) == ([], 0)
