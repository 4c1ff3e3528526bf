"""A user's own task from a .jsonl file, one JSON object per line (blank lines skipped).

Multiple choice: {"input": str, "candidates": [str, ...], "answer": int}
Generation:      {"input": str, "output": str}
An optional template (a Python format string over the row's fields, e.g. "{input} It was") builds the prompt;
without one the prompt is the row's "input". Every problem is a ZoftError naming file:line and the field.
"""

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from zoft.errors import ZoftError
from zoft.tasks.base import Example, Task
from zoft.tasks.encode import check_unicode


def _prompt(row: dict, template: str | None, where: str) -> str:
    if template is None:
        if not isinstance(row.get("input"), str):
            raise ZoftError(f"{where}: field 'input' must be a string (has fields {sorted(row)})")
        return row["input"]
    try:
        return template.format(**row)
    except KeyError as e:
        raise ZoftError(f"{where}: template {template!r} needs field {e}, the row has {sorted(row)}") from e
    except (IndexError, ValueError, AttributeError, TypeError, OverflowError) as e:
        raise ZoftError(f"{where}: template {template!r} does not apply ({type(e).__name__}: {e})") from e


def parse_row(row: object, template: str | None, where: str) -> Example:
    """One JSON value -> Example; `where` ("file:line") prefixes every error message."""
    if not isinstance(row, dict):
        raise ZoftError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if ("candidates" in row) == ("output" in row):
        raise ZoftError(
            f"{where}: a row needs 'candidates' and 'answer' (multiple choice) or 'output' (generation), "
            f"not {'both' if 'output' in row else 'neither'}; it has {sorted(row)}"
        )
    prompt = _prompt(row, template, where)
    if "output" in row:
        if not isinstance(row["output"], str) or not row["output"]:
            raise ZoftError(f"{where}: field 'output' must be a non-empty string, got {row['output']!r:.80}")
        ex = Example(prompt, [row["output"]], 0, kind="gen")
        check_unicode(ex, where)
        return ex
    cands, answer = row["candidates"], row.get("answer")
    if not isinstance(cands, list) or not cands or not all(isinstance(c, str) and c for c in cands):
        raise ZoftError(
            f"{where}: field 'candidates' must be a non-empty list of non-empty strings, got {cands!r:.80}"
        )
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(cands):
        raise ZoftError(
            f"{where}: field 'answer' must be an int index in [0, {len(cands)}), got {answer!r:.80}"
        )
    ex = Example(prompt, list(cands), answer, kind="mc")
    check_unicode(ex, where)
    return ex


def jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    """("file:line", parsed JSON value) for each non-blank line; undecodable bytes or JSON are ZoftErrors."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ZoftError(f"cannot read task file {path}: {e.strerror or e}") from e
    for n, bline in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{n}"
        try:
            line = bline.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise ZoftError(
                f"{where}: not UTF-8 ({e.reason} at byte {e.start}); save the file as UTF-8"
            ) from e
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, huge ints
            raise ZoftError(f"{where}: invalid JSON ({e}); each line must be one JSON object") from e


def parse_rows(rows: Iterable[tuple[str, object]], template: str | None, name: str) -> list[Example]:
    """zoft's multiple-choice or generation rows -> Examples; all rows must be of one kind."""
    examples: list[Example] = []
    first = ""
    for where, row in rows:
        ex = parse_row(row, template, where)
        if examples and ex.kind != examples[0].kind:
            raise ZoftError(
                f"{where}: a '{ex.kind}' row in a file of '{examples[0].kind}' rows (see {first}); "
                "use one kind per file"
            )
        if not examples:
            first = where
        examples.append(ex)
    if not examples:
        raise ZoftError(f"{name} has no rows; each line must be one JSON object")
    return examples


def read_jsonl(path: Path, template: str | None = None) -> list[Example]:
    """All examples of a .jsonl file; all rows must be of one kind (mc or gen)."""
    return parse_rows(jsonl_rows(path), template, str(path))


class JsonlTask(Task):
    """One pool of examples from a .jsonl file; `sample_splits` carves a fixed test set out of it."""

    single_pool = True

    def __init__(self, path: str, template: str | None = None):
        self.path = Path(path)
        self.name = str(path)
        if not self.path.exists():
            raise ZoftError(f"task file {path} does not exist; pass a built-in task name or a .jsonl path")
        self.examples = read_jsonl(self.path, template)  # parse now so errors surface at startup
        self.kind = self.examples[0].kind

    def load_split(self, split: str) -> list[Example]:
        if split != "train":
            raise ZoftError(f"{self.name} is a single pool; use sample_splits to get a test set")
        return list(self.examples)
