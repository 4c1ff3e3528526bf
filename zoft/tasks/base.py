"""Task data model (Example, Task) and MeZO-style seeded sampling of train/dev/test splits.

A task yields raw pools of templated examples; `sample_splits` draws the experiment's splits from them.
Test sets come from a fixed seed so the held-out set never changes with the training seed.
"""

import json
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zoft.errors import ZoftError

TEST_SEED = 0  # fixed: the held-out set is the same for every training seed


@dataclass
class Example:
    """One templated example, ready to tokenize."""

    prompt: str  # fully templated input text, e.g. "the movie rocks It was"
    candidates: list[str]  # continuations, e.g. [" terrible", " great"]; generation rows: [target text]
    answer: int  # index of the gold candidate (0 for generation rows)
    kind: str = "mc"  # "mc" (multiple choice) or "gen" (generation)


class Task:
    """A dataset plus its template. Subclasses set `name` and `kind` and implement `load_split`.

    Tasks with an official train/test split (`single_pool = False`) load "train" and "test".
    Tasks with one pool of data (`single_pool = True`) load everything from "train";
    `sample_splits` then carves a fixed test set out of it.
    """

    name: str = "task"
    kind: str = "mc"
    single_pool: bool = False
    has_dev: bool = False  # a "dev" pool of its own (a validation split): dev is drawn from it, not from train
    has_test: bool = True  # False: no test pool (and not a single pool), so the test split is empty

    def load_split(self, split: str) -> list[Example]:
        """The full raw pool for split "train" or "test" (unsampled, in the source's order)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r})"


def _take_k_per_class(pool: list[Example], order: list[int], k: int) -> list[int]:
    """The first k indices (in `order`) of each answer class; class = index of the gold candidate."""
    counts: dict[int, int] = defaultdict(int)
    picked = []
    for i in order:
        label = pool[i].answer
        if counts[label] < k:
            counts[label] += 1
            picked.append(i)
    return picked


def _draw_train_dev(
    pool: list[Example], order: list[int], n_train: int, n_dev: int, k_shot: int | None
) -> tuple[list[Example], list[Example]]:
    """Train then dev from `order` (already shuffled), without overlap."""
    if k_shot is None:
        train_idx = order[:n_train]
    else:
        train_idx = _take_k_per_class(pool, order, k_shot)
    taken = set(train_idx)
    dev_idx = [i for i in order if i not in taken][:n_dev]
    return [pool[i] for i in train_idx], [pool[i] for i in dev_idx]


def sample_splits(
    task: Task,
    n_train: int = 1000,
    n_dev: int = 500,
    n_test: int = 1000,
    seed: int = 0,
    k_shot: int | None = None,
) -> dict[str, list[Example]]:
    """Draw {"train", "dev", "test"} the way MeZO does; sizes beyond what exists yield fewer examples.

    train and dev: disjoint, from the task's train pool, shuffled by `random.Random(seed)`.
    test: from the task's test pool, shuffled by a fixed seed (independent of `seed`).
    One-pool tasks: shuffle the pool with the fixed seed, take test first, then train/dev from the rest.
    k_shot=k: train is k examples per class (answer index) instead of n_train; dev is unchanged.
    """
    for field, value in [("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test), ("k_shot", k_shot)]:
        if value is not None and value < 0:
            raise ZoftError(f"{field} must be >= 0, got {value}")
    if k_shot is not None and task.kind != "mc":
        raise ZoftError(f"k_shot needs a multiple-choice task; {task.name} is '{task.kind}': use n_train")

    if task.single_pool:
        pool = task.load_split("train")
        fixed = list(range(len(pool)))
        random.Random(TEST_SEED).shuffle(fixed)
        test = [pool[i] for i in fixed[:n_test]]
        rest = sorted(fixed[n_test:])  # sorted so the train/dev draw depends only on `seed`
    else:
        pool = task.load_split("train")
        test_pool = task.load_split("test") if task.has_test else []
        fixed = list(range(len(test_pool)))
        random.Random(TEST_SEED).shuffle(fixed)
        test = [test_pool[i] for i in fixed[:n_test]]
        rest = list(range(len(pool)))

    random.Random(seed).shuffle(rest)
    if task.has_dev:  # a validation split of its own: train takes the train pool, dev comes from it
        train, _ = _draw_train_dev(pool, rest, n_train, 0, k_shot)
        dev_pool = task.load_split("dev")
        order = list(range(len(dev_pool)))
        random.Random(seed).shuffle(order)
        return {"train": train, "dev": [dev_pool[i] for i in order[:n_dev]], "test": test}
    train, dev = _draw_train_dev(pool, rest, n_train, n_dev, k_shot)
    return {"train": train, "dev": dev, "test": test}


def check_splits(task: Task, splits: dict[str, list[Example]], asked: dict[str, int], warn) -> None:
    """Warn when a split comes out smaller than asked (or empty); an empty train split is an error."""
    for split, n in asked.items():
        got = len(splits[split])
        if got < n:
            none = split == "test" and not task.single_pool and not task.has_test
            warn(f"zoft: warning: {task.name}: the {split} split has {got} examples"
                 + (" (empty)" if got == 0 else "") + f", fewer than --n-{split} {n}"
                 + ("; the data has no test split (pass --test-file), so there is no final test" if none else ""))
    if not splits["train"]:
        why = ""
        if task.single_pool and splits["test"]:
            why = (" (its one pool of rows went to the test set first: lower --n-test, or pass separate "
                   "--train-file/--test-file)")
        raise ZoftError(f"task {task.name} gave no training examples{why}; check --n-train / --k-shot and the data")


def hub_rows(name: str, config: str | None, split: str, hint: str) -> list[dict]:
    """Rows of a Hugging Face dataset split, or ZoftError(hint) if `datasets` or the network is missing."""
    try:
        import datasets  # lazy: optional dependency
    except ImportError as e:
        raise ZoftError(hint) from e
    try:
        return list(datasets.load_dataset(name, config, split=split))
    except Exception as e:  # network, auth, cache, unsupported loading scripts: all mean "not reachable"
        first_line = (str(e).splitlines() or [""])[0]
        raise ZoftError(f"{hint} (hub error: {type(e).__name__}: {first_line})") from e


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, object) for each non-blank line of a .jsonl file."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ZoftError(f"{path}:{n}: invalid JSON ({e})") from e
        if not isinstance(row, dict):
            raise ZoftError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
        yield f"{path}:{n}", row
