"""Tasks: loading, templates, sampling and tokenization. Built-ins register in TASKS; any other data goes
through zoft.tasks.rows (files, saved datasets, hub ids).

Usage:
    task = get_task("rotten_tomatoes")  # or get_task("my_data.jsonl", template="{input} It was")
    task = load_task(task_config, chat)  # a TaskConfig: built-in, file, folder, hub id or separate files
    splits = sample_splits(task, n_train=1000, n_dev=500, n_test=1000, seed=0)
    encoded, n_truncated = encode(tokenizer, splits["train"], max_length=256)
"""

import difflib
import os
from collections.abc import Callable

from zoft.config import check_template
from zoft.errors import ZoftError
from zoft.tasks import rows
from zoft.tasks.base import Example, Splits, Task, check_splits, draw_splits, recorded_splits, sample_splits
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


def get_task(name_or_path: str, data_dir: str | None = None, template: str | None = None,
             columns: rows.Columns | None = None, chat: rows.ChatFn | None = None,
             hub: tuple[str, str, str, str] = ("", "train", "validation", "test")) -> Task:
    """A registered task by name; else a file, a folder or a hub id through zoft.tasks.rows."""
    if template:
        check_template(template)  # TaskConfig checks it too; library callers come straight here
    if name_or_path in TASKS:
        return TASKS[name_or_path](data_dir=data_dir, template=template)
    is_path = os.path.exists(name_or_path) or name_or_path.lower().endswith(rows.EXTENSIONS)
    if not is_path and not rows.looks_like_hub_id(name_or_path):
        close = difflib.get_close_matches(name_or_path, list(TASKS), n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ZoftError(f"unknown task {name_or_path!r}; {hint}known tasks: {', '.join(TASKS)}; or a data file "
                        f"({', '.join(rows.EXTENSIONS)}), a folder, or a hub dataset id (owner/name)")
    if data_dir is not None:
        raise ZoftError(f"--data-dir is for built-in tasks; {name_or_path} is your own data, drop --data-dir")
    columns = columns or rows.Columns()
    if name_or_path.endswith(".jsonl") and columns == rows.Columns():  # zoft's rows keep their own reader
        split = rows.read_file(name_or_path)  # a first row that is no object: JsonlTask says where and why
        if not split.columns or rows.detect_format(split.columns, columns, template, name_or_path) == "zoft":
            return JsonlTask(name_or_path, template=template)
    splits = rows.open_source(name_or_path, {}, hub)
    return rows.splits_task(name_or_path, splits, columns, template, chat)


def load_task(tc, chat: rows.ChatFn | None = None) -> Task:
    """The task a TaskConfig names: --train-file/--validation-file/--test-file, else --task."""
    columns = rows.Columns(tc.text_column, tc.label_column, tc.prompt_column, tc.completion_column,
                           tc.messages_column, list(tc.label_names))
    template = tc.template or None
    files = {k: v for k, v in (("train", tc.train_file), ("dev", tc.validation_file), ("test", tc.test_file)) if v}
    if files:
        return rows.splits_task(tc.train_file or "files", rows.open_source("", files, ("",) * 4), columns,
                                template, chat)
    hub = (tc.dataset_config, tc.train_split, tc.validation_split, tc.test_split)
    return get_task(tc.task, tc.data_dir or None, template, columns, chat, hub)


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
    "load_task",
    "check_splits",
    "recorded_splits",
    "sample_splits",
]
