"""Your own data, the way Hugging Face users hold it: files, saved datasets, hub ids, `datasets.Dataset`s.

Sources (one pool, or separate train / validation / test splits):
  - a file: .jsonl (read line by line, so errors name file:line), .json, .csv, .parquet (datasets.load_dataset);
  - a folder written by `save_to_disk`, or a folder holding train.*, validation.* (or dev.*), test.* files;
  - a hub id (`owner/name`, with --dataset-config and --train-split / --validation-split / --test-split);
  - in the Python API: a `datasets.Dataset`, `DatasetDict` or a list of dicts.

Row formats, told apart by their columns (names come from the --*-column flags):
  multiple choice   {"input", "candidates", "answer"}                 zoft's own
  generation        {"input", "output"}                               zoft's own
  prompt/completion {"prompt", "completion"}                          TRL; strings or chat message lists
  classification    {"text", "label"} + --label-names                 label: index or name; candidates " name"
  chat              {"messages": [{"role", "content"}, ...]}           the last (assistant) turn is the answer
Chat messages go through the tokenizer's chat template; everything else through --template when given.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from zoft.errors import ZoftError
from zoft.tasks.base import Example, Task
from zoft.tasks.jsonl import _prompt, jsonl_rows, parse_rows

Rows = Iterable[tuple[str, object]]  # ("where" for error messages, row)
ChatFn = Callable[[list[dict], bool], str]  # (messages, add_generation_prompt) -> text
BUILDERS = {".json": "json", ".csv": "csv", ".parquet": "parquet"}
EXTENSIONS = (".jsonl", *BUILDERS)
SPLIT_FILES = {"train": ("train",), "dev": ("validation", "dev", "valid"), "test": ("test",)}


@dataclass
class Columns:
    """Column names of the non-zoft formats (the --*-column flags) and the classification labels."""

    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    label_names: list[str] = field(default_factory=list)


@dataclass
class Split:
    """One split's rows before conversion: where they came from, the rows, and ClassLabel names if any."""

    source: str
    rows: Rows
    columns: list[str]
    label_names: list[str] | None = None


class RowsTask(Task):
    """Examples already converted from rows: a "train" pool, and optionally "dev" and "test" pools.

    single_pool: one file or Dataset, from which `draw_splits` cuts test, dev and train regions.
    Otherwise the splits are the data's own, used as given: no "test" pool means no test set.
    """

    def __init__(self, name: str, pools: dict[str, list[Example]], single_pool: bool = False):
        self.name, self.pools, self.single_pool = name, pools, single_pool
        self.kind = pools["train"][0].kind
        self.has_dev, self.has_test = "dev" in pools, "test" in pools
        self.given_splits = not single_pool  # the data's own splits: zoft uses them as given

    def load_split(self, split: str) -> list[Example]:
        if split not in self.pools:
            raise ZoftError(f"{self.name} has no {split!r} split; it has {sorted(self.pools)}")
        return list(self.pools[split])


# ---- sources -> Splits -------------------------------------------------------------------------------


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ZoftError("reading this data needs the datasets package: pip install datasets") from None
    datasets.disable_progress_bars()  # zoft's own bars and messages are enough
    return datasets


def from_dataset(ds, source: str) -> Split:
    """A `datasets.Dataset` (or a list of dicts) as one Split."""
    if isinstance(ds, list):
        cols = sorted({k for r in ds[:1] if isinstance(r, dict) for k in r})
        return Split(source, ((f"{source} row {i + 1}", r) for i, r in enumerate(ds)), cols)
    names = None
    feats = getattr(ds, "features", None) or {}
    for f in feats.values():
        if hasattr(f, "names") and hasattr(f, "str2int"):  # a ClassLabel column
            names = list(f.names)
    return Split(source, ((f"{source} row {i + 1}", r) for i, r in enumerate(ds)), list(ds.column_names), names)


def read_file(path: str) -> Split:
    """One data file as a Split; .jsonl by zoft's line reader, the rest through datasets.load_dataset."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in EXTENSIONS:
        raise ZoftError(f"data file {path}: expected a {', '.join(EXTENSIONS)} file")
    if not p.exists():
        raise ZoftError(f"data file {path} does not exist")
    if ext == ".jsonl":
        rows = list(jsonl_rows(p))
        if not rows:
            raise ZoftError(f"{path} has no rows; each line must be one JSON object")
        return Split(path, rows, sorted(rows[0][1]) if isinstance(rows[0][1], dict) else [])
    try:
        ds = _datasets().load_dataset(BUILDERS[ext], data_files=str(p.resolve()), split="train")
    except ZoftError:
        raise
    except Exception as e:  # arrow's parse errors are long; the first line says what went wrong
        raise ZoftError(f"could not read {path} ({type(e).__name__}: {_first_line(e)})") from None
    return from_dataset(ds, path)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _split_files(folder: Path) -> dict[str, str]:
    """train/validation/test files in a folder, by name (train.csv, dev.jsonl, test.parquet, ...)."""
    found = {}
    for split, stems in SPLIT_FILES.items():
        hits = [folder / f"{s}{e}" for s in stems for e in EXTENSIONS if (folder / f"{s}{e}").is_file()]
        if len(hits) > 1:
            raise ZoftError(f"{folder} holds several {split} files ({', '.join(h.name for h in hits)}); keep one")
        if hits:
            found[split] = str(hits[0])
    return found


def read_folder(folder: str) -> dict[str, Split]:
    """A `save_to_disk` folder (Dataset or DatasetDict), or a folder of train/validation/test files."""
    f = Path(folder)
    if (f / "dataset_dict.json").is_file() or (f / "state.json").is_file():
        try:
            saved = _datasets().load_from_disk(str(f))
        except ZoftError:
            raise
        except Exception as e:
            raise ZoftError(f"could not load the saved dataset in {folder} ({type(e).__name__}: {_first_line(e)})") from None
        return _from_dict(saved, folder, "train", "validation", "test")
    files = _split_files(f)
    if "train" not in files:
        raise ZoftError(f"{folder} is neither a save_to_disk folder nor holds a train file "
                        f"(train{'|'.join(EXTENSIONS)}, with optional validation.* and test.*)")
    return {split: read_file(path) for split, path in files.items()}


def _from_dict(d, source: str, train: str, validation: str, test: str) -> dict[str, Split]:
    """A Dataset (one pool) or DatasetDict -> Splits under zoft's names train / dev / test."""
    if not hasattr(d, "keys"):
        return {"pool": from_dataset(d, source)}
    names = {"train": train, "dev": validation, "test": test}
    out = {ours: from_dataset(d[theirs], f"{source}[{theirs}]") for ours, theirs in names.items() if theirs in d}
    if "train" not in out:
        raise ZoftError(f"{source} has splits {sorted(d)}, none named {train!r}; pick one with --train-split")
    return out


def read_hub(name: str, config: str, train: str, validation: str, test: str) -> dict[str, Split]:
    """A Hugging Face hub dataset (all its splits; zoft samples from them)."""
    try:
        d = _datasets().load_dataset(name, config or None)
    except ZoftError:
        raise
    except Exception as e:  # offline, unknown id, gated, a config missing: all end here
        raise ZoftError(f"could not load dataset {name!r} from the Hugging Face hub ({type(e).__name__}: "
                        f"{_first_line(e)}); offline, pass local files with --train-file/--validation-file/"
                        "--test-file or a folder") from None
    return _from_dict(d, name, train, validation, test)


# ---- rows -> Examples --------------------------------------------------------------------------------


def detect_format(cols: list[str], c: Columns, template: str | None, source: str = "the data") -> str:
    have = set(cols)
    if c.messages in have:
        return "chat"
    if c.prompt in have and c.completion in have:
        return "prompt_completion"
    if "candidates" in have or "output" in have:
        return "zoft"
    if c.label in have and (c.text in have or template):
        return "text_label"
    raise ZoftError(
        f"{source}: cannot tell the data format from the columns {sorted(have)}: expected input/candidates/answer "
        f"(multiple choice), input/output (generation), {c.prompt}/{c.completion} (TRL), "
        f"{c.text}/{c.label} (classification, with --label-names) or {c.messages} (chat); "
        "other column names: --text-column, --label-column, --prompt-column, --completion-column, --messages-column"
    )


def _text(value: object, where: str, column: str, chat: ChatFn | None, prompt: bool) -> str:
    """A string column, or a list of chat messages rendered by the chat template."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value:
        msgs = _messages(value, where, column)
        if prompt:
            return _need_chat(chat, where)(msgs, True)
        return "".join(m["content"] for m in msgs)  # a conversational completion: the assistant's text
    raise ZoftError(f"{where}: column {column!r} must be a non-empty string or list of messages, got {value!r:.80}")


def _messages(value: object, where: str, column: str) -> list[dict]:
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise ZoftError(f"{where}: column {column!r} must be a list of {{'role': str, 'content': str}} messages, "
                        f"got {value!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _need_chat(chat: ChatFn | None, where: str) -> ChatFn:
    if chat is None:
        raise ZoftError(f"{where}: chat messages need the model's tokenizer (its chat template)")
    return chat


def _row(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise ZoftError(f"{where}: expected an object (a row with named fields), got {type(row).__name__}")
    return row


def chat_example(row: dict, where: str, c: Columns, chat: ChatFn | None) -> Example:
    msgs = _messages(row.get(c.messages), where, c.messages)
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2 or not msgs[-1]["content"]:
        raise ZoftError(f"{where}: the last message must be a non-empty assistant turn after the prompt "
                        f"(it is the answer zoft trains on); roles here: {[m['role'] for m in msgs]}")
    return Example(_need_chat(chat, where)(msgs[:-1], True), [msgs[-1]["content"]], 0, kind="gen")


def prompt_completion_example(row: dict, where: str, c: Columns, template: str | None,
                              chat: ChatFn | None) -> Example:
    completion = _text(row.get(c.completion), where, c.completion, chat, prompt=False)
    if template is not None:
        return Example(_prompt(row, template, where), [completion], 0, kind="gen")
    return Example(_text(row.get(c.prompt), where, c.prompt, chat, prompt=True), [completion], 0, kind="gen")


def label_candidates(names: list[str]) -> list[str]:
    """Label names as continuations of the prompt: a leading space unless the name brings its own."""
    return [n if n[:1].isspace() else " " + n for n in names]


def text_label_example(row: dict, where: str, c: Columns, template: str | None, names: list[str]) -> Example:
    text = row.get(c.text)
    if template is None and not (isinstance(text, str) and text):
        raise ZoftError(f"{where}: column {c.text!r} must be a non-empty string, got {text!r:.80}")
    prompt = _prompt(row, template, where) if template is not None else text
    label = row.get(c.label)
    if isinstance(label, str) and label in names:
        answer = names.index(label)
    elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(names):
        answer = label
    else:
        raise ZoftError(f"{where}: column {c.label!r} must be an index in [0, {len(names)}) or one of "
                        f"--label-names {names}, got {label!r:.80}")
    return Example(prompt, label_candidates(names), answer, kind="mc")


def to_examples(split: Split, c: Columns, template: str | None, chat: ChatFn | None,
                class_names: list[str] | None = None) -> list[Example]:
    """Every row of a split as an Example; the first bad row is a ZoftError naming where it is."""
    fmt = detect_format(split.columns, c, template, split.source)
    if fmt == "zoft":
        return parse_rows(split.rows, template, split.source)
    names = c.label_names or class_names or split.label_names
    if fmt == "text_label" and not names:
        raise ZoftError(f"{split.source}: text/label rows need --label-names (one word per class, in label "
                        "order, e.g. --label-names terrible great)")
    out = []
    for where, row in split.rows:
        row = _row(row, where)
        if fmt == "chat":
            out.append(chat_example(row, where, c, chat))
        elif fmt == "prompt_completion":
            out.append(prompt_completion_example(row, where, c, template, chat))
        else:
            out.append(text_label_example(row, where, c, template, names))
    if not out:
        raise ZoftError(f"{split.source} has no rows")
    return out


def splits_task(name: str, splits: dict[str, Split], c: Columns, template: str | None,
                chat: ChatFn | None) -> RowsTask:
    """Convert every split ("pool": one pool to carve); the train split's ClassLabel names label the others."""
    one_pool = "pool" in splits
    splits = {"train": splits["pool"]} if one_pool else splits
    pools = {k: to_examples(s, c, template, chat, splits["train"].label_names) for k, s in splits.items()}
    kinds = {k: p[0].kind for k, p in pools.items()}
    if len(set(kinds.values())) > 1:
        raise ZoftError(f"{name}: the splits hold different kinds of rows ({kinds}); use one format for all")
    return RowsTask(name, pools, one_pool)


def looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(EXTENSIONS)


def open_source(spec: str, files: dict[str, str], hub: tuple[str, str, str, str]) -> dict[str, Split]:
    """--task SPEC (file, folder or hub id) or --train-file/--validation-file/--test-file -> Splits under
    train / dev / test, or under "pool" for one file or Dataset that sample_splits carves."""
    if files:
        if "train" not in files:
            raise ZoftError("--validation-file/--test-file need --train-file too")
        return {k: read_file(v) for k, v in files.items()}
    if os.path.isdir(spec):
        return read_folder(spec)
    if os.path.isfile(spec) or spec.lower().endswith(EXTENSIONS):
        return {"pool": read_file(spec)}
    return read_hub(spec, *hub)



def chat_renderer(get_tokenizer: Callable[[], object]) -> ChatFn:
    """Render messages with the tokenizer's chat template; the tokenizer is loaded at the first chat row.

    The tokenizer adds its BOS again when zoft tokenizes the prompt, so a BOS the template writes is dropped.
    """
    state: dict = {}

    def render(messages: list[dict], add_generation_prompt: bool) -> str:
        if "tok" not in state:
            state["tok"] = tok = get_tokenizer()
            if not getattr(tok, "chat_template", None):
                raise ZoftError(f"chat rows need a tokenizer with a chat template; {getattr(tok, 'name_or_path', '')!r} "
                                "has none: use prompt/completion rows, or a chat model")
        tok = state["tok"]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        bos = getattr(tok, "bos_token", None)
        if bos and text.startswith(bos) and tok("x")["input_ids"][:1] == [tok.bos_token_id]:
            text = text[len(bos):]
        return text

    return render
