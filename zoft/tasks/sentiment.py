"""Binary sentiment tasks with MeZO's SST-2 template: "{text} It was" -> " terrible" / " great".

rotten_tomatoes: vendored Rotten Tomatoes snippets (vaderSentiment 3.3.2, MIT), works offline.
sst2: GLUE SST-2 from the Hugging Face hub, or GLUE's train.tsv/dev.tsv in --data-dir.
imdb: IMDB from the Hugging Face hub, or train.jsonl/test.jsonl or the aclImdb folders in --data-dir.
"""

import gzip
import re
from pathlib import Path

from zoft.errors import ZoftError
from zoft.tasks.base import Example, Task, hub_rows, read_jsonl

TEMPLATE = "{text} It was"
CANDIDATES = [" terrible", " great"]  # index = label: 0 negative, 1 positive
DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def _fill(template: str, text: str) -> str:
    try:
        return template.format(text=text)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ZoftError(
            f"bad template {template!r} ({type(e).__name__}: {e}); the only field is {{text}}"
        ) from e


class SentimentTask(Task):
    """Shared template logic; subclasses implement `_load(split) -> list[(text, label)]`."""

    kind = "mc"

    def __init__(self, data_dir: str | None = None, template: str | None = None):
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.template = template or TEMPLATE
        _fill(self.template, "")  # fail early on a bad template

    def _load(self, split: str) -> list[tuple[str, int]]:
        raise NotImplementedError

    def load_split(self, split: str) -> list[Example]:
        if split not in ("train", "test"):
            raise ZoftError(f"{self.name} has splits 'train' and 'test', not {split!r}")
        return [
            Example(_fill(self.template, text), list(CANDIDATES), label) for text, label in self._load(split)
        ]


class RottenTomatoes(SentimentTask):
    """10,568 Rotten Tomatoes snippets; label = mean human score > 0 (neutral rows, score 0, dropped)."""

    name = "rotten_tomatoes"
    single_pool = True

    def _load(self, split: str) -> list[tuple[str, int]]:
        if split != "train":
            raise ZoftError("rotten_tomatoes has a single pool; use sample_splits to get a test set")
        path = DATA_DIR / "rotten_tomatoes_snippets.tsv.gz"
        if not path.is_file():
            raise ZoftError(f"{path} is missing; reinstall zoft (the file ships as package data)")
        rows = []
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:  # id \t mean score \t text (texts hold '' quotes, so no csv module)
                _, score, text = line.rstrip("\n").split("\t", 2)
                if float(score) != 0:
                    rows.append((text.strip(), int(float(score) > 0)))
        return rows


def _label(value: object, where: str) -> int:
    if value in (0, 1, "0", "1") and not isinstance(value, bool):
        return int(value)
    raise ZoftError(f"{where}: label must be 0 or 1, got {value!r}")


class SST2(SentimentTask):
    """GLUE SST-2: 67,349 train sentences, test pool = the 872-sentence validation split."""

    name = "sst2"
    HINT = (
        "sst2 needs the Hugging Face hub (pip install datasets, network) or --data-dir with "
        "GLUE SST-2 train.tsv/dev.tsv; offline, use --task rotten_tomatoes"
    )

    def _load(self, split: str) -> list[tuple[str, int]]:
        if self.data_dir is None:
            rows = hub_rows("glue", "sst2", "train" if split == "train" else "validation", self.HINT)
            return [(r["sentence"].strip(), int(r["label"])) for r in rows]
        path = self.data_dir / ("train.tsv" if split == "train" else "dev.tsv")
        if not path.is_file():
            raise ZoftError(f"{path} not found; {self.HINT}")
        lines = path.read_text(encoding="utf-8").splitlines()
        header = lines[0].split("\t") if lines else []
        if "sentence" not in header or "label" not in header:
            raise ZoftError(
                f"{path}:1: header must have columns 'sentence' and 'label' (GLUE format), got {header}"
            )
        s, l = header.index("sentence"), header.index("label")
        rows = []
        for n, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) != len(header):
                raise ZoftError(f"{path}:{n}: expected {len(header)} tab-separated columns, got {len(cols)}")
            rows.append((cols[s].strip(), _label(cols[l], f"{path}:{n}: field 'label'")))
        return rows


def _clean_imdb(text: str) -> str:
    return " ".join(re.sub(r"<br\s*/?>", " ", text, flags=re.IGNORECASE).split())


class IMDB(SentimentTask):
    """IMDB movie reviews: 25,000 train, 25,000 test."""

    name = "imdb"
    HINT = (
        "imdb needs the Hugging Face hub (pip install datasets, network) or --data-dir with "
        "train.jsonl/test.jsonl or the aclImdb folders (train/pos, train/neg, test/pos, test/neg); "
        "offline, use --task rotten_tomatoes"
    )

    def _load(self, split: str) -> list[tuple[str, int]]:
        if self.data_dir is None:
            rows = [(r["text"], int(r["label"])) for r in hub_rows("imdb", None, split, self.HINT)]
        elif (self.data_dir / f"{split}.jsonl").is_file():
            rows = self._load_jsonl(self.data_dir / f"{split}.jsonl")
        else:
            root = self.data_dir / "aclImdb" if (self.data_dir / "aclImdb").is_dir() else self.data_dir
            rows = self._load_folders(root / split)
        return [(_clean_imdb(text), label) for text, label in rows]

    def _load_jsonl(self, path: Path) -> list[tuple[str, int]]:
        rows = []
        for where, row in read_jsonl(path):
            if not isinstance(row.get("text"), str):
                raise ZoftError(f'{where}: field \'text\': each row must be {{"text": str, "label": 0|1}}')
            rows.append((row["text"], _label(row.get("label"), f"{where}: field 'label'")))
        return rows

    def _load_folders(self, folder: Path) -> list[tuple[str, int]]:
        if not (folder / "pos").is_dir() or not (folder / "neg").is_dir():
            raise ZoftError(f"{folder}/pos and {folder}/neg not found; {self.HINT}")
        return [
            (p.read_text(encoding="utf-8"), label)
            for label, sub in [(0, "neg"), (1, "pos")]
            for p in sorted((folder / sub).glob("*.txt"))  # sorted: listdir order is not deterministic
        ]
