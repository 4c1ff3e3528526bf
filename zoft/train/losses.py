"""The per-row losses a ZO step estimates from: one loss per perturbation row.

`row_losses` reads the engine's scores (candidate cross-entropy, or the gold answer's LM loss);
`f1_row_losses` is MeZO's non-differentiable objective for generation tasks (−F1 of greedy answers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoft.engine.native import Scores
from zoft.engine.packing import Batch
from zoft.models.common import Rows
from zoft.session import Session
from zoft.tasks.encode import Encoded


def row_losses(s: Scores, b: Batch, loss: str) -> torch.Tensor:
    """(P,) mean loss per row. 'candidate': CE over length-normalised candidate scores (MeZO);
    'lm': mean NLL of the gold candidate's tokens (the batch must have been built gold_only)."""
    if loss == "candidate":
        rows, E, K = s.table.shape
        return F.cross_entropy(s.table.reshape(rows * E, K), b.answers.repeat(rows), reduction="none").view(rows, E).mean(1)
    if loss == "lm":
        return -(s.cand_mean).mean(1)
    raise ValueError(loss)


def f1_row_losses(s: Session, batch: list[Encoded], golds: list[list[str]], rows) -> torch.Tensor:
    """MeZO's non-differentiable objective: −F1 of greedy answers, one decode per perturbation row."""
    from zoft.evaluate import stop_tokens
    from zoft.tasks.metrics import f1

    stop = stop_tokens(s.tokenizer)
    rows = Rows(rows) if isinstance(rows, int) else rows
    total = torch.zeros(rows.P, dtype=torch.float64)
    for e, gold in zip(batch, golds, strict=True):
        for r, out in enumerate(s.model.generate(e.prompt_ids, 50, stop, rows=rows)):
            total[r] += f1(s.tokenizer.decode(out).split("\n")[0].strip(), gold)
    return -total / len(batch)
