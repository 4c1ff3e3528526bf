"""Accuracy by candidate log-likelihood, batched through the engine.

A candidate's score is Σ log p(token | input, earlier candidate tokens); the prediction is the
candidate with the highest length-normalised score (MeZO's rule; for one-token candidates it is the
same as the sum).
"""

from __future__ import annotations

import json

import torch
from tqdm import tqdm

from zoft.errors import ZoftError
from zoft.tasks.encode import Encoded


@torch.no_grad()
def evaluate(engine, encoded: list[Encoded], batch_size: int = 32, desc: str | None = None) -> dict:
    """{"accuracy", "n", "rows"}: rows hold candidate_logprobs (sums, candidate order), prediction, answer."""
    rows = []
    bar = tqdm(range(0, len(encoded), batch_size), desc=desc, leave=False, disable=desc is None, unit="batch")
    for i in bar:
        chunk = encoded[i : i + batch_size]
        b = engine.batch(chunk)
        s = engine.scores(b, rows=1)
        sums = s.cand_sum[0].double().cpu()
        if not torch.isfinite(sums).all():
            raise ZoftError("the model gives non-finite candidate scores: its weights diverged or overflowed; "
                            "lower --lr (or --eps) and train again")
        table = s.table[0].cpu()
        ex = b.cand_example.cpu().tolist()
        for e_idx, e in enumerate(chunk):
            lp = [float(sums[c]) for c in range(len(ex)) if ex[c] == e_idx]
            pred = int(table[e_idx, : len(e.cand_ids)].argmax())
            rows.append({"candidate_logprobs": lp, "prediction": pred, "answer": e.answer})
    acc = sum(r["prediction"] == r["answer"] for r in rows) / max(1, len(rows))
    return {"accuracy": acc, "n": len(rows), "rows": rows}


def write_predictions(path: str, rows: list[dict], examples=None) -> None:
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            out = dict(r)
            if examples is not None:
                out = {"input": examples[i].prompt, "candidates": examples[i].candidates, **out}
            f.write(json.dumps(out) + "\n")
