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
    """One JSON row per example, written whole (aside, then renamed)."""
    from zoft.train.rundir import write_atomic

    lines = []
    for i, r in enumerate(rows):
        out = dict(r)
        if examples is not None:
            out = {"input": examples[i].prompt, "candidates": examples[i].candidates, **out}
        lines.append(json.dumps(out) + "\n")
    write_atomic(path, "".join(lines))


def answers_of(ex) -> list[str]:
    """Every gold answer of a generation example (SQuAD-style lists), else its single target."""
    return list(getattr(ex, "answers", None) or [ex.candidates[0].strip()])


def stop_tokens(tokenizer) -> set[int]:
    """Generation stops at a newline (MeZO's rule) or at end of sequence."""
    nl = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return set(nl[-1:]) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.no_grad()
def evaluate_generation(model, tokenizer, encoded: list[Encoded], examples, max_new: int = 50,
                        desc: str | None = None, batch_size: int = 16) -> dict:
    """Greedy decoding with a KV cache (native models), `batch_size` prompts at a time (similar lengths
    together), stopping at a newline or after max_new tokens; SQuAD-style exact match and F1 against
    every gold answer (`examples[i].answers`, else the target)."""
    from zoft.tasks.metrics import qa_scores

    if not hasattr(model, "generate_batch") or not hasattr(model, "blocks"):
        raise ZoftError("generation tasks are evaluated with a native model (OPT, Llama family); use --engine native")
    stop = stop_tokens(tokenizer)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].prompt_ids))
    texts: dict[int, str] = {}
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm(chunks, desc=desc, leave=False, disable=desc is None, unit="batch"):
        outs = model.generate_batch([encoded[i].prompt_ids for i in chunk], max_new, stop)
        for i, out in zip(chunk, outs, strict=True):
            texts[i] = tokenizer.decode(out).split("\n")[0].strip()
    preds = [texts[i] for i in range(len(encoded))]
    golds = [answers_of(ex) for ex in examples]
    rows = [{"prediction": p, "answers": g} for p, g in zip(preds, golds, strict=True)]
    return {**qa_scores(preds, golds), "n": len(rows), "rows": rows}


def evaluate_split(engine, session, encoded: list[Encoded], examples, batch_size: int = 32,
                   desc: str | None = None) -> dict:
    """Accuracy for multiple-choice examples, exact match / F1 by greedy generation for generation ones.
    Always holds "score" (accuracy or F1) and "metric" (its name). An empty split is an error: its score
    would be a number that measures nothing."""
    if not encoded:
        raise ZoftError(f"nothing to evaluate: the {desc or 'dev'} split is empty; ask for examples "
                        "(--n-dev / --n-test) or check the data")
    if examples and examples[0].kind == "gen":
        ev = evaluate_generation(session.model, session.tokenizer, encoded, examples, desc=desc, batch_size=batch_size)
        return ev | {"score": ev["f1"], "metric": "f1"}
    ev = evaluate(engine, encoded, batch_size, desc)
    return ev | {"score": ev["accuracy"], "metric": "accuracy"}


def evaluation_row(engine, session, enc: dict, splits: dict, at: int, batch_size: int, with_test: bool) -> dict:
    """The metrics row of a training run's evaluation after `at` steps: dev's score (dev_accuracy or dev_f1),
    and with `with_test` (--eval-test) test's beside it, for curves; the best checkpoint is picked on dev."""
    ev = evaluate_split(engine, session, enc["dev"], splits["dev"], batch_size)
    row = {"step": at, f"dev_{ev['metric']}": ev["score"]}
    if with_test and enc["test"]:
        row[f"test_{ev['metric']}"] = evaluate_split(engine, session, enc["test"], splits["test"], batch_size,
                                                     desc="test eval")["score"]
    return row


def with_demonstrations(examples, demos, sep: str = "\n\n") -> list:
    """In-context learning: each prompt preceded by the same k solved training examples (prompt + gold)."""
    import dataclasses

    shots = sep.join(d.prompt + d.candidates[d.answer] for d in demos)
    return [dataclasses.replace(e, prompt=shots + sep + e.prompt) if shots else e for e in examples]
