"""Tasks: loading, templates, sampling and tokenization. Built-ins register in TASKS; a .jsonl path works too.

Usage:
    task = get_task("rotten_tomatoes")  # or get_task("my_data.jsonl", template="{input} It was")
    splits = sample_splits(task, n_train=1000, n_dev=500, n_test=1000, seed=0)
    encoded, n_truncated = encode(tokenizer, splits["train"], max_length=256)
"""

import difflib
import os
from collections.abc import Callable

from zoft.errors import ZoftError
from zoft.tasks.base import Example, Splits, Task, draw_splits, recorded_splits, sample_splits
from zoft.tasks.encode import Encoded, encode
from zoft.tasks.jsonl import JsonlTask
from zoft.tasks.qa import DROP, SQuAD
from zoft.tasks.sentiment import IMDB, SST2, RottenTomatoes
from zoft.tasks.superglue import CB, COPA, RTE, WSC, BoolQ, MultiRC, ReCoRD, WiC, datasets_importable

TASKS: dict[str, Callable[..., Task]] = {
    "rotten_tomatoes": RottenTomatoes,
    "sst2": SST2,
    "imdb": IMDB,
    # MeZO's suite (templates from princeton-nlp/MeZO large_models/templates.py)
    "rte": RTE,
    "cb": CB,
    "boolq": BoolQ,
    "wsc": WSC,
    "wic": WiC,
    "multirc": MultiRC,
    "copa": COPA,
    "record": ReCoRD,
    "squad": SQuAD,
    "drop": DROP,
}


def describe_tasks() -> list[tuple[str, str, str, bool, str]]:
    """(name, kind, source, reachable_now, note) per registered task, for `zoft tasks`.

    reachable_now: loads without --data-dir on this machine (packaged data, a fetched BIG-bench copy, or
    `datasets` importable; the network itself is not probed).
    """
    sentiment = {  # the sentiment tasks predate `describe`
        "rotten_tomatoes": ("packaged (vaderSentiment snippets)", True, "offline; single pool"),
        "sst2": ("hub glue/sst2 | --data-dir train.tsv and dev.tsv", None, "MeZO SST-2 template"),
        "imdb": ("hub imdb | --data-dir train.jsonl/test.jsonl or aclImdb/", None, "MeZO SST-2 template"),
    }
    rows = []
    for name, cls in TASKS.items():
        if hasattr(cls, "describe"):
            source, reachable, note = cls.describe()
        else:
            source, reachable, note = sentiment.get(name, ("", None, ""))
            reachable = datasets_importable() if reachable is None else reachable
        rows.append((name, getattr(cls, "kind", "mc"), source, reachable, note))
    return rows


def get_task(name_or_path: str, data_dir: str | None = None, template: str | None = None) -> Task:
    """A registered task by name, or a JsonlTask for a path ending in .jsonl (or any existing file)."""
    if name_or_path in TASKS:
        return TASKS[name_or_path](data_dir=data_dir, template=template)
    if name_or_path.endswith(".jsonl") or os.path.isfile(name_or_path):
        if data_dir is not None:
            raise ZoftError(
                f"--data-dir is for built-in tasks; {name_or_path} is a file task, drop --data-dir"
            )
        return JsonlTask(name_or_path, template=template)
    close = difflib.get_close_matches(name_or_path, list(TASKS), n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ZoftError(
        f"unknown task {name_or_path!r}; {hint}known tasks: {', '.join(TASKS)}, or a path to a .jsonl file"
    )


__all__ = [
    "TASKS",
    "Encoded",
    "Example",
    "JsonlTask",
    "Splits",
    "Task",
    "ZoftError",
    "describe_tasks",
    "draw_splits",
    "encode",
    "get_task",
    "recorded_splits",
    "sample_splits",
]
