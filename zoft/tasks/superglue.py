"""SuperGLUE tasks with MeZO's prompts: RTE, CB, BoolQ, WSC, WiC, MultiRC, COPA, ReCoRD.

Templates, verbalizers and candidate order are those of princeton-nlp/MeZO `large_models/templates.py` and
`tasks.py`, in the versions MeZO runs by default (BoolQTemplateV3, ReCoRDTemplateGPT3, `wsc.fixed`). Prompt and
candidates split where MeZO's `encode_prompt` splits them: the prompt is `encode(sample).strip(" ")`; a candidate
is what `verbalize(sample, c).strip(" ")` adds after it (`mezo_split`).

Where the data comes from is decided once, when the task is made (`DatasetTask`):
  --data-dir   the dataset's own files: the official SuperGLUE zips' train.jsonl / val.jsonl, in data_dir or
               data_dir/<RTE|CB|BoolQ|...>/ (or, for tasks with an offline copy, a BIG-bench cache folder);
  the hub      `datasets.load_dataset(...)` when `datasets` is importable (imported only when loading);
  BIG-bench    the fetched copy (bigbench.py; MultiRC, SQuAD, DROP), when `datasets` is not importable.
Test pools are validation splits (SuperGLUE's test labels are hidden); the BIG-bench copies are one pool.
"""

import importlib.util
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from zoft.errors import ZoftError
from zoft.tasks import bigbench
from zoft.tasks.base import Example, Task, hub_rows, read_jsonl

Rows = Iterable[tuple[str, dict]]  # (where: "file:line" for error messages, row with the hub's field names)


def datasets_importable() -> bool:
    """Whether `import datasets` would work, checked without importing it (slow, optional dependency)."""
    if "datasets" in sys.modules:
        return sys.modules["datasets"] is not None
    return importlib.util.find_spec("datasets") is not None


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set: the hub is not to be reached."""
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# what a row missing or mistyping a field raises while it is read or templated
FIELD_ERRORS = (KeyError, IndexError, TypeError, AttributeError, ValueError)


def field_error(where: str, e: Exception, task: "DatasetTask") -> ZoftError:
    return ZoftError(
        f"{where}: bad or missing field ({type(e).__name__}: {e}); {task.name} rows need {task.fields}"
    )


def mezo_split(encoded: str, continuations: list[str]) -> tuple[str, list[str]]:
    """(prompt, candidates) from MeZO's encode() text and the text each verbalize() appends to it.

    MeZO strips spaces (not newlines) from both ends of the prompt and of each full text, and scores the tokens
    the full text adds: "X so " + "the sun rose." -> ("X so", [" the sun rose."]).
    """
    prompt = encoded.strip(" ")
    return prompt, [(encoded + c).strip(" ")[len(prompt) :] for c in continuations]


@dataclass
class MultiGoldExample(Example):
    """A multiple-choice example with several correct candidates (ReCoRD: one entity, several names)."""

    golds: list[int] = field(default_factory=list)  # indices of all correct candidates; `answer` is golds[0]


class DatasetTask(Task):
    """A dataset read from --data-dir, the Hugging Face hub or the BIG-bench cache, templated by `example`.

    Subclasses set the class attributes below and implement `example(row) -> Example | None` (None: skip the row,
    as the hub's loader does). Rows use the hub's field names; `from_hub`, `local_rows` and `bigbench_rows`
    convert each source to them.
    """

    hub: tuple[str, str | None]  # datasets.load_dataset(name, config)
    hub_test: str = "validation"  # the hub split used as the test pool
    files: dict[str, tuple[str, ...]]  # split -> accepted file names in --data-dir (first found wins)
    folder: str = ""  # the folder the official archive unpacks to; --data-dir may point above it
    offline: bool = False  # has a BIG-bench copy (bigbench.FILES[name])
    fields: str = ""  # the row fields, for error messages
    note: str = ""  # one line for `describe_tasks`

    def __init__(self, data_dir: str | None = None, template: str | None = None):
        if template is not None:
            raise ZoftError(
                f"{self.name} uses MeZO's template; --template applies to the sentiment tasks and .jsonl files"
            )
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.source, self.root = self._resolve()

    def _resolve(self) -> tuple[str, Path | None]:
        """("local" | "hub" | "bigbench" | "none", folder); fixed up front so `single_pool` is known early."""
        if self.data_dir is not None:
            if not self.data_dir.is_dir():
                raise ZoftError(f"--data-dir {self.data_dir} is not a folder; {self.hint()}")
            if self.offline and bigbench.task_file(self.name, self.data_dir):
                return "bigbench", self.data_dir
            return "local", self.data_dir
        cached = self.offline and bigbench.task_file(self.name)
        if datasets_importable() and not (cached and hub_offline()):  # offline: a fetched copy beats the hub
            return "hub", None
        if cached:
            return "bigbench", bigbench.cache_root()
        return "none", None

    @property
    def single_pool(self) -> bool:  # the BIG-bench copies hold evaluation data only
        return self.source == "bigbench"

    @classmethod
    def local_desc(cls) -> str:
        names = f"{cls.files['train'][0]} and {cls.files['test'][0]}"
        return f"{names} (or {cls.folder}/ holding them)" if cls.folder else names

    @classmethod
    def hint(cls) -> str:
        ways = [
            "the Hugging Face hub (pip install datasets, network)",
            f"--data-dir with {cls.local_desc()}",
        ]
        if cls.offline:
            ways.append(
                f"the BIG-bench copy (fetch it once: zoft tasks --fetch-bigbench; {bigbench.cache_root()})"
            )
        return f"{cls.name} needs " + ", or ".join(ways)

    @classmethod
    def describe(cls) -> tuple[str, bool, str]:
        """(sources, loadable now without --data-dir, note); the hub counts as loadable if `datasets` imports."""
        hub = "/".join(x for x in cls.hub if x)
        source = f"hub {hub} | --data-dir {cls.local_desc()}"
        cached = cls.offline and bigbench.task_file(cls.name) is not None
        if cls.offline:
            source += " | BIG-bench cache" + (" (fetched)" if cached else " (not fetched)")
        return source, datasets_importable() or cached, cls.note

    # ---- sources -> rows ----

    def from_hub(self, row: dict) -> dict:
        return row

    def local_rows(self, path: Path, split: str) -> Rows:
        raise NotImplementedError

    def bigbench_rows(self, path: Path) -> Rows:
        raise NotImplementedError

    def example(self, row: dict) -> Example | None:
        raise NotImplementedError

    def _local_file(self, split: str) -> Path:
        bases = [self.root, self.root / self.folder] if self.folder else [self.root]
        for base in bases:
            for name in self.files[split]:
                if (base / name).is_file():
                    return base / name
        raise ZoftError(f"{self.root} has no {' or '.join(self.files[split])}; {self.hint()}")

    def load_split(self, split: str) -> list[Example]:
        if split not in ("train", "test"):
            raise ZoftError(f"{self.name} has splits 'train' and 'test', not {split!r}")
        if self.source == "none":
            raise ZoftError(self.hint())
        if self.source == "bigbench":
            if split != "train":
                raise ZoftError(
                    f"{self.name} from BIG-bench is a single pool; use sample_splits to get a test set"
                )
            rows = self.bigbench_rows(bigbench.task_file(self.name, self.root))
        elif self.source == "hub":
            hub_split = "train" if split == "train" else self.hub_test
            raw = hub_rows(*self.hub, hub_split, self.hint())
            rows = [(f"hub {self.hub[0]}[{hub_split}] row {i}", self.from_hub(r)) for i, r in enumerate(raw)]
        else:
            rows = self.local_rows(self._local_file(split), split)
        out, where = [], f"{self.root or self.hub[0]} (first row)"
        try:  # readers are generators: a field error may surface while reading the row after `where`
            for where, row in rows:
                ex = self.example(row)
                if ex is None:
                    continue
                if not 0 <= ex.answer < len(ex.candidates):
                    raise ZoftError(
                        f"{where}: label {ex.answer} out of range for {len(ex.candidates)} candidates"
                    )
                out.append(ex)
        except FIELD_ERRORS as e:
            raise field_error(where, e, self) from e
        return out


class SuperGlueTask(DatasetTask):
    """A SuperGLUE task: hub super_glue/<config>, or the official zip's train.jsonl / val.jsonl."""

    kind = "mc"
    files = {"train": ("train.jsonl",), "test": ("val.jsonl",)}
    labels: list = [False, True]  # label values in the .jsonl files, in the hub's class order (-> 0, 1, ...)

    def local_rows(self, path: Path, split: str) -> Rows:
        for where, row in read_jsonl(path):
            try:
                rows = self.from_local(row, where)
            except FIELD_ERRORS as e:
                raise field_error(where, e, self) from e
            for r in rows:
                yield where, r

    def from_local(self, row: dict, where: str) -> list[dict]:
        """One .jsonl object -> rows in the hub's shape (label as the class index)."""
        return [{**row, "label": self._label(row.get("label"), where)}]

    def _label(self, value: object, where: str) -> int:
        if value is None or value not in self.labels:
            raise ZoftError(f"{where}: field 'label' must be one of {self.labels}, got {value!r:.40}")
        return self.labels.index(value)


class RTE(SuperGlueTask):
    """RTE (2,490 train, 277 validation). Label 0 entailment -> "Yes", 1 not_entailment -> "No"."""

    name = "rte"
    hub = ("super_glue", "rte")
    folder = "RTE"
    labels = ["entailment", "not_entailment"]
    fields = "premise, hypothesis, label"
    note = "MeZO RTETemplate; candidates Yes/No; test pool = validation"

    def example(self, r: dict) -> Example:
        text = f'{r["premise"]}\nDoes this mean that "{r["hypothesis"]}" is true? Yes or No?\n'
        return Example(*mezo_split(text, ["Yes", "No"]), int(r["label"]))


class CB(SuperGlueTask):
    """CommitmentBank (250 train, 56 validation). 0 entailment -> "Yes", 1 contradiction -> "No", 2 neutral -> "Maybe"."""

    name = "cb"
    hub = ("super_glue", "cb")
    folder = "CB"
    labels = ["entailment", "contradiction", "neutral"]
    fields = "premise, hypothesis, label"
    note = "MeZO CBTemplate; candidates Yes/No/Maybe; test pool = validation"

    def example(self, r: dict) -> Example:
        text = f'Suppose {r["premise"]} Can we infer that "{r["hypothesis"]}"? Yes, No, or Maybe?\n'
        return Example(*mezo_split(text, ["Yes", "No", "Maybe"]), int(r["label"]))


class BoolQ(SuperGlueTask):
    """BoolQ (9,427 train, 3,270 validation). Candidates ["Yes", "No"] in MeZO's order: True -> 0, False -> 1.

    MeZO loads the hub's `boolq` (passages without the article title), not super_glue/boolq, whose passages
    start with "<title> -- ". --data-dir takes either Google's files (train.jsonl/dev.jsonl with "answer"; the
    same text as MeZO) or SuperGLUE's (train.jsonl/val.jsonl with "label"; passages keep the title prefix).
    """

    name = "boolq"
    hub = ("boolq", None)
    folder = "BoolQ"
    files = {"train": ("train.jsonl",), "test": ("val.jsonl", "dev.jsonl")}
    fields = "passage, question, label (SuperGLUE) or answer (Google)"
    note = "MeZO BoolQTemplateV3 (hub 'boolq', as MeZO); candidates Yes/No; test pool = validation"

    def from_hub(self, row: dict) -> dict:
        return {"passage": row["passage"], "question": row["question"], "label": int(bool(row["answer"]))}

    def from_local(self, row: dict, where: str) -> list[dict]:
        value = row["answer"] if "label" not in row and "answer" in row else row.get("label")
        return [{**row, "label": self._label(value, where)}]

    def example(self, r: dict) -> Example:
        q = r["question"] if r["question"].endswith("?") else r["question"] + "?"
        q = q[0].upper() + q[1:]
        return Example(*mezo_split(f"{r['passage']} {q}\n", ["Yes", "No"]), 1 - int(r["label"]))


def _fix_wsc_span(text: str, span: str, index: int) -> str:
    """The hub's `wsc.fixed` repair of a span that is not a substring of the text (super_glue.py `_fix_wst`).

    Its "theyscold" branch changes nothing it returns (a discarded str.replace and an index read earlier); omitted.
    """
    if span in text or span in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
        return span
    first_word = text.split()[index]
    span = (span[0].lower() if first_word[0].islower() else span[0].upper()) + span[1:]
    return span.rstrip(".").replace("\n", " ")


class WSC(SuperGlueTask):
    """Winograd Schema Challenge, `wsc.fixed` (554 train, 104 validation). Candidates ["No", "Yes"] = label."""

    name = "wsc"
    hub = ("super_glue", "wsc.fixed")
    folder = "WSC"
    fields = "text, target.span1_text, target.span2_text (span1_index, span2_index), label"
    note = "MeZO WSCTemplate on wsc.fixed; candidates No/Yes; test pool = validation"

    def from_local(self, row: dict, where: str) -> list[dict]:
        r = {**row, **row["target"], "label": self._label(row.get("label"), where)}
        for k in ("span1", "span2"):
            r[f"{k}_text"] = _fix_wsc_span(r["text"], r[f"{k}_text"], r[f"{k}_index"])
        return [r]

    def example(self, r: dict) -> Example:
        text = (
            f'{r["text"]}\nIn the previous sentence, does the pronoun "{r["span2_text"].lower()}" '
            f"refer to {r['span1_text']}? Yes or No?\n"
        )
        return Example(*mezo_split(text, ["No", "Yes"]), int(r["label"]))


class WiC(SuperGlueTask):
    """Word-in-Context (5,428 train, 638 validation). Candidates ["No", "Yes"] = label."""

    name = "wic"
    hub = ("super_glue", "wic")
    folder = "WiC"
    fields = "word, sentence1, sentence2, label"
    note = "MeZO WICTemplate; candidates No/Yes; test pool = validation"

    def example(self, r: dict) -> Example:
        text = (
            f'Does the word "{r["word"]}" have the same meaning in these two sentences? Yes, No?\n'
            f"{r['sentence1']}\n{r['sentence2']}\n"
        )
        return Example(*mezo_split(text, ["No", "Yes"]), int(r["label"]))


class MultiRC(SuperGlueTask):
    """MultiRC, one example per (paragraph, question, answer) (27,243 train, 4,848 validation). ["No", "Yes"].

    Paragraphs keep SuperGLUE's "<b>Sent 1: </b>...<br>" markup, as in MeZO. Offline: the BIG-bench copy
    (Natural Instructions subtask058: 3,623 questions, 19,306 answers; one pool, markup stripped).
    """

    name = "multirc"
    hub = ("super_glue", "multirc")
    folder = "MultiRC"
    labels = [0, 1]
    offline = True
    fields = "passage.text, passage.questions[].question, .answers[].text, .answers[].label"
    note = (
        "MeZO MultiRCTemplate; candidates No/Yes; test pool = validation. BIG-bench copy: NI subtask058, "
        "single pool, paragraphs without SuperGLUE's <b>/<br> markup"
    )

    def from_local(self, row: dict, where: str) -> list[dict]:
        passage = row["passage"]
        return [
            {
                "paragraph": passage["text"],
                "question": q["question"],
                "answer": a["text"],
                "label": self._label(
                    a.get("label"), f"{where} question {q.get('idx')} answer {a.get('idx')}"
                ),
            }
            for q in passage["questions"]
            for a in q["answers"]
        ]

    def bigbench_rows(self, path: Path) -> Rows:
        return bigbench.multirc_rows(path)

    def example(self, r: dict) -> Example:
        text = (
            f'{r["paragraph"]}\nQuestion: {r["question"]}\nI found this answer "{r["answer"]}". '
            "Is that correct? Yes or No?\n"
        )
        return Example(*mezo_split(text, ["No", "Yes"]), int(r["label"]))


def _copa_choice(choice: str) -> str:
    """MeZO's CopaTemplate(capitalization="correct"): lower-case the whole first word unless it is "I"."""
    words = choice.split(" ")
    if words[0] != "I":
        words[0] = words[0].lower()
    return " ".join(words)


class COPA(SuperGlueTask):
    """COPA (400 train, 100 validation): "<premise without final '.'> so|because" + each choice, first word lowered."""

    name = "copa"
    hub = ("super_glue", "copa")
    folder = "COPA"
    labels = [0, 1]
    fields = "premise, choice1, choice2, question (cause|effect), label"
    note = "MeZO CopaTemplate; candidates = the two choices; test pool = validation"

    def example(self, r: dict) -> Example:
        premise = r["premise"].rstrip()
        if premise.endswith("."):
            premise = premise[:-1]
        conj = {"effect": " so ", "cause": " because "}[r["question"]]
        choices = [_copa_choice(r["choice1"]), _copa_choice(r["choice2"])]
        return Example(*mezo_split(premise + conj, choices), int(r["label"]))


class ReCoRD(SuperGlueTask):
    """ReCoRD (100,730 train, 10,000 validation queries), MeZO's ReCoRDTemplateGPT3.

    Prompt: the passage with "@highlight\\n" -> "- ", then "\\n-"; candidates: " " + the query with "@placeholder"
    replaced by each entity (the passage's distinct entity strings, sorted, as the hub lists them). answer: the
    first gold entity in sorted order (MeZO's training target); all gold entities in `golds`.
    Queries whose answers are not among the entities are skipped (MeZO would fail on them).
    """

    name = "record"
    hub = ("super_glue", "record")
    folder = "ReCoRD"
    fields = "passage.text, passage.entities[].start/end, qas[].query, qas[].answers[].text"
    note = "MeZO ReCoRDTemplateGPT3; candidates = one query per passage entity; test pool = validation"

    def from_local(self, row: dict, where: str) -> list[dict]:
        text = row["passage"]["text"]
        spans = row["passage"]["entities"]  # "end" is inclusive
        entities = sorted({text[e["start"] : e["end"] + 1] for e in spans})
        return [
            {
                "passage": text,
                "query": qa["query"],
                "entities": entities,
                "answers": sorted({a["text"] for a in qa.get("answers", [])}),
            }
            for qa in row["qas"]
        ]

    def example(self, r: dict) -> MultiGoldExample | None:
        entities = sorted(set(r["entities"]))
        golds = [entities.index(a) for a in sorted(set(r["answers"])) if a in entities]
        if not golds:
            return None
        passage = r["passage"].replace("@highlight\n", "- ")
        conts = [" " + r["query"].replace("@placeholder", e) for e in entities]
        return MultiGoldExample(*mezo_split(f"{passage}\n-", conts), golds[0], golds=golds)
