"""Generation tasks with MeZO's prompts: SQuAD v1.1 and DROP, scored by exact match / F1 (metrics.py).

Prompts follow princeton-nlp/MeZO `large_models/templates.py` (SQuADv2Template, which MeZO also uses for SQuAD
v1.1, and DROPTemplate). The one candidate is MeZO's training target: " " + the first gold answer + "\\n" (its
verbalize() ends with "\\n", the token MeZO's generation stops at); all gold answers stay in `answers`.

Sources (see superglue.DatasetTask): the hub (`squad`, `drop`), --data-dir with the datasets' own files
(train-v1.1.json / dev-v1.1.json; drop_dataset_train.json / drop_dataset_dev.json), or the BIG-bench copy
(bigbench.py: SQuAD v1.1 dev, DROP via Natural Instructions; one pool each).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

from zoft.errors import ZoftError
from zoft.tasks import bigbench
from zoft.tasks.base import Example
from zoft.tasks.superglue import DatasetTask, Rows, mezo_split

STOP = "\n"  # ends MeZO's gold continuation; its generation uses "\n" as end of sequence


@dataclass
class GenExample(Example):
    """A generation example: candidates = [target text]; `answers` = every gold answer, for exact_match / f1."""

    kind: str = "gen"
    answers: list[str] = field(default_factory=list)


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ZoftError(f"cannot read {path} as JSON ({type(e).__name__}: {e})") from e


def squad_rows(path: Path) -> Rows:
    """Rows {"title", "context", "question", "answers"} of a file in SQuAD v1.1's JSON format."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ZoftError(f"{path}: expected SQuAD's JSON format {{'data': [{{'title', 'paragraphs'}}]}}")
    for a, article in enumerate(data["data"]):
        for p, para in enumerate(article["paragraphs"]):
            for qa in para["qas"]:
                row = {
                    "title": article.get("title", ""),
                    "context": para["context"],
                    "question": qa["question"],
                    "answers": [ans["text"] for ans in qa["answers"]],
                }
                yield f"{path} article {a} paragraph {p} question {qa.get('id')}", row


def _drop_answers(answers: list[dict]) -> list[str]:
    """The hub's `answers_spans.spans` for DROP answer objects (HF drop.py `build_answers`).

    A number, a date ("day month year", blanks kept as the hub joins them) or the spans; [] where the hub
    skips the question (an answer that is both number and date/spans, or no answer at all).
    """
    spans: list[str] = []
    for ans in answers:
        d = ans.get("date") or {}
        date = [d.get("day", ""), d.get("month", ""), d.get("year", "")]
        if ans.get("number", "") != "":
            if any(date) or ans.get("spans"):
                return []
            spans.append(ans["number"])
        elif any(date):
            if ans.get("spans"):
                return []
            spans.append(" ".join(date).strip())
        spans.extend(ans.get("spans", []))
    return spans


def drop_json_rows(path: Path, split: str) -> Rows:
    """Rows {"passage", "question", "answers"} of drop_dataset_{train,dev}.json; answers as the hub builds them:
    train from "answer", dev from "validated_answers"."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ZoftError(f"{path}: expected DROP's JSON format {{section_id: {{'passage', 'qa_pairs'}}}}")
    for section_id, section in data.items():
        for qa in section["qa_pairs"]:
            golds = [qa["answer"]] if split == "train" else qa.get("validated_answers", [])
            row = {"passage": section["passage"], "question": qa["question"], "answers": _drop_answers(golds)}
            yield f"{path} {section_id} {qa.get('query_id')}", row


class SQuAD(DatasetTask):
    """SQuAD v1.1 (87,599 train, 10,570 validation). BIG-bench copy: the dev set (10,565 questions), one pool."""

    name = "squad"
    kind = "gen"
    hub = ("squad", None)
    files = {"train": ("train-v1.1.json",), "test": ("dev-v1.1.json",)}
    offline = True
    fields = "title, context, question, answers"
    note = (
        "MeZO SQuAD template; F1/EM; test pool = validation. BIG-bench copy: SQuAD v1.1 dev only, single pool"
    )

    def from_hub(self, row: dict) -> dict:
        return {**row, "answers": list(row["answers"]["text"])}

    def local_rows(self, path: Path, split: str) -> Rows:
        return squad_rows(path)

    def bigbench_rows(self, path: Path) -> Rows:
        return squad_rows(path)

    def example(self, r: dict) -> GenExample | None:
        answers = [str(a) for a in r["answers"]]
        if not answers:
            return None
        text = f"Title: {r['title']}\nContext: {r['context']}\nQuestion: {r['question'].strip()}\nAnswer:"
        prompt, target = mezo_split(text, [f" {answers[0]}{STOP}"])
        return GenExample(prompt, target, 0, answers=answers)


class DROP(DatasetTask):
    """DROP (77,400 train, 9,535 validation on the hub). Multi-span answers count as separate gold answers.

    BIG-bench copy: Natural Instructions subtask028 (6,500 questions, 97% with number answers, unlike DROP's
    mix; whitespace normalized), one pool.
    """

    name = "drop"
    kind = "gen"
    hub = ("drop", None)
    files = {"train": ("drop_dataset_train.json",), "test": ("drop_dataset_dev.json",)}
    folder = "drop_dataset"
    offline = True
    fields = "passage, question, answers"
    note = (
        "MeZO DROP template; F1/EM; test pool = validation. BIG-bench copy: NI subtask028 (6,500 questions, "
        "mostly numbers), single pool"
    )

    def from_hub(self, row: dict) -> dict:
        return {**row, "answers": list(row["answers_spans"]["spans"])}

    def local_rows(self, path: Path, split: str) -> Rows:
        return drop_json_rows(path, split)

    def bigbench_rows(self, path: Path) -> Rows:
        return bigbench.drop_rows(path)

    def example(self, r: dict) -> GenExample | None:
        answers = [str(a) for a in r["answers"]]
        if not answers:
            return None
        text = f"Passage: {r['passage']}\nQuestion: {r['question'].strip()}\nAnswer:"
        prompt, target = mezo_split(text, [f" {answers[0]}{STOP}"])
        return GenExample(prompt, target, 0, answers=answers)
