"""One ZO step's forward work: L₊, L₋ and the projected gradients of a batch (this rank's shard of it),
through the session's perturber and `zoft.zo.perturbers.estimate`.
"""

from __future__ import annotations

import torch

from zoft import distributed as dist
from zoft.session import Session
from zoft.tasks.encode import Encoded
from zoft.train.losses import f1_row_losses, row_losses
from zoft.zo.perturbers import estimate


def pack_batch(engine, batch: list[Encoded], loss: str):
    """The engine's packed batch for `loss` (built on the host; see step_losses' `next_batch`)."""
    return engine.batch(batch, gold_only=(loss == "lm"))


def step_losses(engine, s: Session, batch: list[Encoded], loss: str, seeds: list[int], eps: float,
                golds: list[list[str]] | None = None, reduce: bool = True, packed=None, next_batch=None,
                ahead: dict | None = None, lazy: bool = False):
    """L₊, L₋ per direction and the projected gradients for one batch (this rank's shard of it).
    loss="f1" (generation tasks) needs `golds`, the answers of each example. `packed`: this batch
    already packed (pack_batch). `next_batch`: the next step's examples, packed into ahead["packed"]
    while this step's forward runs (on a GPU the packing overlaps the forward).
    lazy: g is returned as a device tensor and nothing waits for the forward; else a list."""
    if loss == "f1":
        row_fn = lambda rows: f1_row_losses(s, batch, golds, rows)
    else:
        b = packed if packed is not None else pack_batch(engine, batch, loss)
        logits_only = loss == "candidate" and b.single_token
        row_fn = lambda rows: row_losses(engine.scores(b, rows, logits_only, graph=True), b, loss)

    def mean_over_ranks(v: torch.Tensor) -> torch.Tensor:  # (P,) local means -> global means
        if not reduce or dist.world()[1] == 1:
            return v
        tot = dist.all_reduce_sum(torch.cat([v.double() * len(batch), torch.full((1,), float(len(batch)), dtype=torch.float64, device=v.device)]))
        return tot[:-1] / tot[-1]

    early = None
    if next_batch is not None and ahead is not None and loss != "f1":
        early = lambda: ahead.update(packed=pack_batch(engine, next_batch, loss))
    lp, lm, g = estimate(lambda rows: mean_over_ranks(row_fn(rows)), s.perturber, seeds, eps, early)
    return lp, lm, (g if lazy else g.tolist())
