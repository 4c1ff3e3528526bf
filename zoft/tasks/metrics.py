"""SQuAD-style answer metrics for generation tasks (SQuAD, DROP): exact match and token F1, max over gold answers.

Same normalization and F1 as the SQuAD v1.1 evaluation script and MeZO's `large_models/metrics.py`:
lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace. A prediction with no token
in common with a gold answer scores F1 0, also when both normalize to the empty string (v1.1 rule).
"""

import re
import string
from collections import Counter

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """'The  Denver Broncos!' -> 'denver broncos'."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalization (tokens counted with multiplicity)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 if the prediction equals any gold answer after normalization, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in golds))


def f1(prediction: str, golds: list[str]) -> float:
    """Best token F1 over the gold answers (0.0 with no gold answers)."""
    return max((token_f1(prediction, g) for g in golds), default=0.0)


def qa_scores(predictions: list[str], golds: list[list[str]]) -> dict[str, float]:
    """{"em", "f1"}: means over examples, each in [0, 1]."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} examples")
    n = max(1, len(predictions))
    return {
        "em": sum(exact_match(p, g) for p, g in zip(predictions, golds)) / n,
        "f1": sum(f1(p, g) for p, g in zip(predictions, golds)) / n,
    }
