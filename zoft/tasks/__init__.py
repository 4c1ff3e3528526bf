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
from zoft.tasks.base import Example, Task, sample_splits
from zoft.tasks.encode import Encoded, encode
from zoft.tasks.jsonl import JsonlTask
from zoft.tasks.sentiment import IMDB, SST2, RottenTomatoes

TASKS: dict[str, Callable[..., Task]] = {
    "rotten_tomatoes": RottenTomatoes,
    "sst2": SST2,
    "imdb": IMDB,
}


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
    "Task",
    "ZoftError",
    "encode",
    "get_task",
    "sample_splits",
]
