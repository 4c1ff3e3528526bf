"""Property tests: whatever the command line, `zoft train` ends in success or one clean user error (exit
status 2, no traceback); `--layers` parses to valid block lists or a ZoftError; a template over any row
gives a prompt or a ZoftError.

`zoft.cli.main` runs in this process. Most cases point --model at a path that does not exist, so every
flag's value goes through argparse and the config checks and the run stops at loading (milliseconds);
a smaller set trains a tiny random OPT for at most 2 steps with values kept cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tiny import make_tiny
from zoft.cli import main as zoft_main
from zoft.config import SECTIONS, add_arguments, parse_layers
from zoft.errors import ZoftError
from zoft.tasks.jsonl import parse_row

FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def run_cli(argv: list[str]) -> tuple[int, str]:
    """zoft.cli.main(argv) -> (exit status, stderr); any exception other than SystemExit propagates."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            zoft_main(argv)
        except SystemExit as e:
            return (e.code if isinstance(e.code, int) else 1), err.getvalue()
    return 0, err.getvalue()


def assert_clean(code: int, stderr: str) -> None:
    assert code in (0, 2), f"exit {code}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    if code == 2:  # argparse's usage error, or zoft's single line
        assert re.search(r"^(zoft: error: |usage: zoft)", stderr, re.M) or "error:" in stderr, stderr[-3000:]


# ---- any flags, any values, a model that does not exist ------------------------------------------------

GARBAGE = st.sampled_from(["", "x", "-1", "0", "3-1", "top", "nan", "inf", "-inf", "1e400", "1.5", "--", "-",
                           "99999999999999999999999", "-99999999999999999999", " ", "top4", "lora", "é", "0x10"])


def train_flags() -> list[argparse.Action]:
    """The options of `zoft train`, rebuilt the way the CLI builds them (from the config dataclasses)."""
    p = argparse.ArgumentParser()
    for cls in SECTIONS:
        add_arguments(p, cls)
    return [a for a in p._actions if a.option_strings and a.dest not in ("help", "model", "output_dir")]


def value_for(action: argparse.Action) -> st.SearchStrategy[list[str]]:
    """Plausible values of the option's type (or its choices), or garbage."""
    if action.choices:
        plausible = st.sampled_from(list(action.choices)).map(lambda v: [v])
    elif action.type is int:
        plausible = st.integers(-(10**20), 10**20).map(lambda v: [str(v)])
    elif action.type is float:
        plausible = st.floats(allow_nan=True, allow_infinity=True).map(lambda v: [repr(v)])
    elif action.nargs == "+":
        plausible = st.lists(st.text(max_size=6), min_size=1, max_size=3)
    else:
        plausible = st.text(max_size=12).map(lambda v: [v])
    return st.one_of(plausible, GARBAGE.map(lambda v: [v]), st.just([]))  # []: the flag with no value


@st.composite
def command_lines(draw) -> list[str]:
    args = []
    for action in draw(st.lists(st.sampled_from(train_flags()), max_size=6)):
        if isinstance(action, argparse.BooleanOptionalAction):
            args.append(draw(st.sampled_from(action.option_strings)))
        else:
            args += [action.option_strings[0], *draw(value_for(action))]
    if draw(st.booleans()):
        args.insert(draw(st.integers(0, len(args))), draw(st.sampled_from(["--bogus", "stray", "-x", "--steps=1"])))
    return args


@FAST
@given(args=command_lines())
def test_any_command_line_fails_cleanly(tmp_path_factory, args):
    out = tmp_path_factory.mktemp("o")
    code, err = run_cli(["train", "--model", str(out / "no-such-model"), *args, "--output-dir", str(out / "run")])
    assert_clean(code, err)
    assert code == 2  # nothing can succeed without a model


# ---- cheap values, a tiny model that trains --------------------------------------------------------------

def ints(lo: int, hi: int, bad: list[int]) -> tuple[st.SearchStrategy, list[str]]:
    return st.integers(lo, hi).map(str), [str(v) for v in bad]


def choice(good: list[str], bad: str) -> tuple[st.SearchStrategy, list[str]]:
    return st.sampled_from(good), [bad]


FLOAT = (st.floats(0, 2).map(repr), ["-1", "nan", "inf", "-inf", "x", "0"])
TINY = {  # flag: (values that keep a tiny run to a fraction of a second, bad values)
    "--steps": ints(0, 2, [-2]),
    "--batch-size": ints(1, 6, [0, -1]),
    "--n-train": ints(0, 10, [-1]),
    "--n-dev": ints(0, 3, [-1]),
    "--n-test": ints(0, 3, [-1]),
    "--k-shot": ints(0, 2, [-1]),
    "--mode": choice(["lora", "full"], "bogus"),
    "--layers": (st.sampled_from(["", "0", "2", "1-2", "top1", "bottom2", "0,2"]),
                 ["3-1", "0,3-1", "top4", "bottom0", "x", "9", "-1", "0,,1"]),
    "--lora-r": ints(1, 4, [0, -1]),
    "--lora-targets": (st.sampled_from(["q", "v", "k", "o", "fc1", "fc2"]), ["gate", "nope", ""]),
    "--lora-alpha": FLOAT,
    "--eps": FLOAT,
    "--lr": FLOAT,
    "--directions": ints(1, 3, [0, -1]),
    "--weight-decay": FLOAT,
    "--schedule": choice(["constant", "linear", "cosine"], "step"),
    "--warmup": ints(0, 3, [-2]),
    "--dtype": choice(["float32", "bfloat16", "float16"], "int8"),
    "--engine": choice(["auto", "native", "hf"], "vllm"),
    "--max-length": ints(8, 48, [-2, 0, 1, 2, 3]),
    "--truncation": choice(["left", "error"], "right"),
    "--loss": choice(["auto", "candidate", "lm"], "mse"),
    "--eval-every": ints(0, 2, [-1]),
    "--save-every": ints(0, 2, [-1]),
    "--eval-batch-size": ints(1, 8, [-1]),  # 0: see test_eval_batch_size_zero
    "--cache-mb": FLOAT,
    "--pack-tokens": ints(1, 64, [0, -1]),
    "--log-every": ints(0, 2, [-1]),
    "--guard-threshold": FLOAT,
    "--guard-lr-factor": FLOAT,
    "--guard-strikes": ints(0, 3, [-1]),
    "--seed": ints(0, 2**70, [-5]),
}


@st.composite
def tiny_command_lines(draw) -> list[str]:
    """Up to 6 flags, each with a good value or (one time in four) a bad one."""
    args = []
    for flag in draw(st.lists(st.sampled_from(sorted(TINY)), max_size=6, unique=True)):
        good, bad = TINY[flag]
        bad_one = draw(st.integers(0, 3)) == 3
        args += [flag, draw(st.sampled_from(bad)) if bad_one else draw(good)]
    if draw(st.integers(0, 5)) == 5:
        args.append(draw(st.sampled_from(["--resume", "--no-zero-shot"])))
    return args


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny("opt", str(tmp_path_factory.mktemp("tiny")))


BASE = ["--task", "rotten_tomatoes", "--n-train", "8", "--n-dev", "2", "--n-test", "2", "--batch-size", "4",
        "--steps", "1", "--device", "cpu"]


@settings(FAST, max_examples=20)
@given(args=tiny_command_lines())
def test_tiny_runs_succeed_or_fail_cleanly(tiny, args):
    with tempfile.TemporaryDirectory() as out:  # later flags override BASE's
        code, err = run_cli(["train", "--model", tiny, *BASE, *args, "--output-dir", out + "/run"])
    assert_clean(code, err)


def test_eval_batch_size_zero(tiny, tmp_path):
    assert_clean(*run_cli(["train", "--model", tiny, *BASE, "--eval-batch-size", "0", "--output-dir",
                           str(tmp_path / "run")]))


def test_unknown_device(tiny, tmp_path):
    assert_clean(*run_cli(["train", "--model", tiny, *BASE, "--device", "xyz", "--output-dir",
                           str(tmp_path / "run")]))


# ---- --layers ------------------------------------------------------------------------------------------

LAYER_TEXT = st.one_of(
    st.text(alphabet="0123456789-, topbmx+_", max_size=14),
    st.tuples(st.sampled_from(["top", "bottom", ""]), st.text(alphabet="0123456789-,+ ", max_size=8)).map("".join),
).filter(lambda s: all(len(d) <= 5 for d in re.findall(r"\d+", s)))  # a longer range is its own test below


@FAST
@given(spec=LAYER_TEXT, n=st.integers(1, 48))
def test_parse_layers_any_string(spec, n):
    try:
        out = parse_layers(spec, n)
    except ZoftError as e:
        assert "--layers" in str(e)
        return
    if spec == "":
        assert out is None
    else:
        assert out and out == sorted(set(out)) and all(0 <= i < n for i in out)


@st.composite
def layer_specs(draw) -> tuple[str, int, list[int]]:
    """A well-formed spec and the blocks it names."""
    n = draw(st.integers(1, 48))
    kind = draw(st.sampled_from(["top", "bottom", "list"]))
    if kind != "list":
        k = draw(st.integers(1, n))
        return f"{kind}{k}", n, list(range(n - k, n)) if kind == "top" else list(range(k))
    parts, want = [], set()
    for _ in range(draw(st.integers(1, 4))):
        a = draw(st.integers(0, n - 1))
        b = draw(st.integers(a, n - 1))
        parts.append(str(a) if a == b and draw(st.booleans()) else f"{a}-{b}")
        want |= set(range(a, b + 1))
    return ",".join(parts), n, sorted(want)


@FAST
@given(case=layer_specs())
def test_parse_layers_names_exactly_the_blocks(case):
    spec, n, want = case
    assert parse_layers(spec, n) == want


def test_parse_layers_huge_range_is_a_zofterror():
    with pytest.raises(ZoftError):
        parse_layers("0-1000000000000", 4)


# ---- templates over rows ---------------------------------------------------------------------------------

FIELDS = st.sampled_from(["input", "question", "x", "a b", "0", "", "label", "candidates", "answer"])
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6,
)
SPECS = st.text(alphabet="<>^=+- #0,_.%123cdefgnosxXb", max_size=5)


@st.composite
def templates(draw, fields: list[str]) -> str:
    names = st.sampled_from(fields + ["missing", "0", ""]) if fields else st.sampled_from(["missing", "0", ""])
    pieces = []
    for _ in range(draw(st.integers(0, 4))):
        piece = draw(st.sampled_from(["text", "field", "conv", "spec", "index", "attr", "nested", "brace", "raw"]))
        name = draw(names)
        pieces.append({
            "text": draw(st.text(alphabet="ab {}:!", max_size=4)),
            "field": f"{{{name}}}",
            "conv": f"{{{name}!{draw(st.sampled_from('rsaz'))}}}",
            "spec": f"{{{name}:{draw(SPECS)}}}",
            "index": f"{{{name}[{draw(st.sampled_from(['0', '-1', 'x', '99', '']))}]}}",
            "attr": f"{{{name}.{draw(st.sampled_from(['real', 'upper', 'nope', '']))}}}",
            "nested": f"{{{name}:{{{draw(names)}}}}}",
            "brace": draw(st.sampled_from(["{{", "}}", "{", "}", "{}", "{0}"])),
            "raw": draw(st.text(max_size=6)),
        }[piece])
    return "".join(pieces)


@st.composite
def row_and_template(draw) -> tuple[dict, str]:
    row = draw(st.dictionaries(FIELDS, VALUES, max_size=4))
    row |= {"candidates": [" no", " yes"], "answer": 1}
    row.pop("output", None)
    return row, draw(templates(sorted(row)))


@FAST
@given(case=row_and_template())
def test_template_gives_a_prompt_or_a_zofterror(case):
    row, template = case
    try:
        ex = parse_row(row, template, "t.jsonl:7")
    except ZoftError as e:
        assert str(e).startswith("t.jsonl:7: ")
    else:
        assert isinstance(ex.prompt, str)


def test_template_overflow_is_a_zofterror():
    with pytest.raises(ZoftError):
        parse_row({"input": "x", "n": -1, "candidates": [" a", " b"], "answer": 0}, "{n:c}", "t.jsonl:1")
