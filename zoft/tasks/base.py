"""Task data model (Example, Task) and MeZO-style seeded sampling of train/dev/test splits.

A task yields raw pools of templated examples; `draw_splits` draws the experiment's splits from them.
Each pool is cut by a fixed shuffle into test, dev and train regions that depend on the pool alone, so
an evaluation split never holds a training example whatever the sizes or seeds asked. A run records
the indices and content hashes of its draw (`Splits.manifest`, RUN/splits.json), and `zoft eval` on
the run reads them back (`recorded_splits`).
"""

import dataclasses
import hashlib
import json
import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zoft.errors import ZoftError

TEST_SEED = 0  # fixed: the held-out regions are the same for every training seed
RESERVE = 1000  # at most this many examples of a pool in each held-out region (MeZO's test size)


@dataclass
class Example:
    """One templated example, ready to tokenize."""

    prompt: str  # fully templated input text, e.g. "the movie rocks It was"
    candidates: list[str]  # continuations, e.g. [" terrible", " great"]; generation rows: [target text]
    answer: int  # index of the gold candidate (0 for generation rows)
    kind: str = "mc"  # "mc" (multiple choice) or "gen" (generation)


class Task:
    """A dataset plus its template. Subclasses set `name` and `kind` and implement `load_split`.

    Tasks with an official train/test split (`single_pool = False`) load "train" and "test" (and "dev"
    with `has_dev`). Tasks with one pool of data (`single_pool = True`) load everything from "train";
    `draw_splits` then carves fixed test and dev regions out of it.
    """

    name: str = "task"
    kind: str = "mc"
    single_pool: bool = False
    has_dev: bool = False  # a "dev" pool of its own (a validation split): dev is drawn from it, not from train
    has_test: bool = True  # False: no test pool (and not a single pool), so the test split is empty
    given_splits: bool = False  # the user's own train/validation/test splits: used as given (see draw_splits)

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


def held_out(n: int) -> int:
    """Examples a pool of n keeps out of training for each held-out region: a fifth, at most RESERVE, at
    least one. It depends on the pool alone, never on the sizes asked, so no draw can cross regions."""
    return min(RESERVE, max(1, n // 5)) if n else 0


def example_hash(ex: Example) -> str:
    """A content hash of one templated example (prompt, candidates, answer, every extra field)."""
    blob = json.dumps(dataclasses.asdict(ex), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def pool_hash(hashes: list[str]) -> str:
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:16]


@dataclass
class Splits:
    """A draw of train/dev/test: the examples, where each came from (pool name, index) and their hashes."""

    examples: dict[str, list[Example]]
    pools: dict[str, str]  # split -> the pool it indexes: "train" or "test"
    indices: dict[str, list[int]]
    hashes: dict[str, list[str]]
    pool_sizes: dict[str, int]
    pool_hashes: dict[str, str]
    repeated: int = 0  # drawn training examples whose content is also a drawn dev or test example's

    def manifest(self, **about) -> dict:
        """What RUN/splits.json records: which examples each split holds, and the data they came from."""
        return {**about, "pools": {p: {"size": self.pool_sizes[p], "hash": self.pool_hashes[p]} for p in self.pool_sizes},
                "splits": {k: {"pool": self.pools[k], "indices": self.indices[k], "hashes": self.hashes[k]}
                           for k in self.examples}}


def draw_splits(
    task: Task,
    n_train: int = 1000,
    n_dev: int = 500,
    n_test: int = 1000,
    seed: int = 0,
    k_shot: int | None = None,
) -> Splits:
    """Draw {"train", "dev", "test"}; sizes beyond what a region holds yield fewer examples.

    Each pool is cut once, by a fixed shuffle, into regions that no size or seed moves:
    two pools (train + test): test from the whole test pool; dev from the first held_out(n) examples of
    the train pool, train from the rest.
    a dev pool of its own (the data's validation split, `has_dev`): the splits are the data's, as given:
    train from the whole train pool, dev from the dev pool, test from the test pool (none without one).
    given_splits (the user's own split files or a hub id's splits): used as given, never filtered against
    each other; `Splits.repeated` counts drawn training examples that repeat a drawn dev or test one.
    one pool: test from the first held_out(n), dev from the next held_out(n), train from the rest.
    test is a fixed prefix of its region (the same whatever `seed`); dev and train are drawn from theirs
    by `random.Random(seed)`. So no evaluation split, whatever its size, ever holds a training example
    (nor a copy of one: an example held out in one region is dropped from the regions after it).
    k_shot=k: train is k examples per class (answer index) instead of n_train; dev is unchanged.
    """
    for field_, value in [("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test), ("k_shot", k_shot)]:
        if value is not None and value < 0:
            raise ZoftError(f"{field_} must be >= 0, got {value}")
    if k_shot is not None and task.kind != "mc":
        raise ZoftError(f"k_shot needs a multiple-choice task; {task.name} is '{task.kind}': use n_train")

    pools = {"train": task.load_split("train")}
    if task.has_dev:
        pools["dev"] = task.load_split("dev")
    if not task.single_pool and task.has_test:
        pools["test"] = task.load_split("test")
    hashes = {p: [example_hash(e) for e in exs] for p, exs in pools.items()}
    fixed = {}
    for p, exs in pools.items():
        fixed[p] = list(range(len(exs)))
        random.Random(TEST_SEED).shuffle(fixed[p])
    n = len(pools["train"])
    where = {"train": "train", "dev": "dev" if task.has_dev else "train", "test": "train" if task.single_pool else "test"}
    if task.single_pool:
        t, d = held_out(n), held_out(n)
        test_region, dev_region, train_region = fixed["train"][:t], fixed["train"][t : t + d], fixed["train"][t + d :]
    elif task.has_dev:  # the data's own validation split (the user's files, a hub id's): used as given
        test_region, dev_region, train_region = fixed.get("test", []), fixed["dev"], fixed["train"]
    else:
        test_region, dev_region, train_region = fixed.get("test", []), fixed["train"][: held_out(n)], fixed["train"][held_out(n) :]

    # a pool may hold one example twice (rotten_tomatoes does), and two pools one example each: a copy of a
    # held-out example never trains (nor does a copy of a test example select). The user's own splits are
    # used as given (a copy across them is counted in `repeated`); a dev region zoft cuts still holds its copies.
    given_dev = task.given_splits and task.has_dev
    held = set() if task.given_splits else {hashes[where["test"]][i] for i in test_region}
    if not given_dev:
        dev_region = [i for i in dev_region if hashes[where["dev"]][i] not in held]
        held |= {hashes[where["dev"]][i] for i in dev_region}
    train_region = [i for i in train_region if hashes["train"][i] not in held]
    dev_order, train_order = sorted(dev_region), sorted(train_region)  # sorted: the draw depends on `seed` alone
    random.Random(seed).shuffle(dev_order)
    random.Random(seed).shuffle(train_order)
    train_pool = pools["train"]
    idx = {
        "train": train_order[:n_train] if k_shot is None else _take_k_per_class(train_pool, train_order, k_shot),
        "dev": dev_order[:n_dev],
        "test": test_region[:n_test],
    }
    drawn = {k: [hashes[where[k]][i] for i in v] for k, v in idx.items()}
    return Splits(
        examples={k: [pools[where[k]][i] for i in v] for k, v in idx.items()},
        pools=where,
        indices=idx,
        hashes=drawn,
        pool_sizes={p: len(exs) for p, exs in pools.items()},
        pool_hashes={p: pool_hash(h) for p, h in hashes.items()},
        repeated=sum(h in set(drawn["dev"]) | set(drawn["test"]) for h in drawn["train"]),
    )


def sample_splits(
    task: Task,
    n_train: int = 1000,
    n_dev: int = 500,
    n_test: int = 1000,
    seed: int = 0,
    k_shot: int | None = None,
) -> dict[str, list[Example]]:
    """{"train", "dev", "test"} lists of examples; see draw_splits."""
    return draw_splits(task, n_train, n_dev, n_test, seed, k_shot).examples


def recorded_splits(task: Task, manifest: dict, where: str) -> dict[str, list[Example]]:
    """The examples a run recorded in its splits.json (`where` names that file), checked against their hashes:
    data that changed since the run is an error, never a silently different evaluation set."""
    pools = {"train": task.load_split("train")}
    out = {}
    for name, rec in manifest["splits"].items():
        if not rec["indices"]:  # an empty split (data without a test split): no pool to read
            out[name] = []
            continue
        pool = pools.get(rec["pool"])
        if pool is None:
            pool = pools[rec["pool"]] = task.load_split(rec["pool"])
        exs = []
        for i, h in zip(rec["indices"], rec["hashes"], strict=True):
            if i >= len(pool) or example_hash(pool[i]) != h:
                raise ZoftError(f"{task.name}'s data changed since the run: example {i} of its {rec['pool']} pool "
                                f"is not the one {where} records for the {name} split; evaluate with the data the "
                                "run used, or pass --task and sizes to draw new splits")
            exs.append(pool[i])
        out[name] = exs
    return out


def carved(task: Task, split: str) -> bool:
    """Whether `split` comes from a held-out region cut out of a larger pool (so it holds at most a fifth of it)."""
    return task.single_pool and split != "train" or split == "dev" and not task.has_dev


def check_splits(task: Task, splits: dict[str, list[Example]], asked: dict[str, int], warn) -> None:
    """Warn when a split comes out smaller than asked (or empty); an empty train split is an error."""
    for split, n in asked.items():
        got = len(splits[split])
        if got < n:
            none = split == "test" and not task.single_pool and not task.has_test
            warn(f"zoft: warning: {task.name}: the {split} split has {got} examples"
                 + (" (empty)" if got == 0 else "") + f", fewer than --n-{split} {n}"
                 + ("; the data has no test split (pass --test-file), so there is no final test" if none else "")
                 + (f" (a held-out region holds a fifth of its pool, at most {RESERVE})" if carved(task, split) else ""))
    if not splits["train"]:
        why = ""
        if task.single_pool:
            why = (" (a one-pool task keeps a fifth of its rows, at least one, for each of test and dev, and copies of "
                   "those never train: give it more rows, or pass separate --train-file/--validation-file/--test-file)")
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
