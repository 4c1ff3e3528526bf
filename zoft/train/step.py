"""One ZO step's forward work: L₊, L₋ and the projected gradients of a batch (this rank's shard of it),
through the session's perturber and `zoft.zo.perturbers.estimate`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from zoft import distributed as dist
from zoft.session import Session
from zoft.tasks.encode import Encoded
from zoft.train.losses import f1_row_losses, row_losses
from zoft.train.pipeline import HostCopy
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
    row_fn = _row_fn(engine, s, batch, loss, golds, packed)
    early = None
    if next_batch is not None and ahead is not None and loss != "f1":
        early = lambda: ahead.update(packed=pack_batch(engine, next_batch, loss))
    lp, lm, g = estimate(lambda rows: _mean_over_ranks(row_fn(rows), len(batch), reduce), s.perturber, seeds, eps, early)
    return lp, lm, (g if lazy else g.tolist())


def query_losses(engine, s: Session, batch: list[Encoded], loss: str, query,
                 golds: list[list[str]] | None = None, lazy: bool = False) -> list[float] | torch.Tensor:
    """Every row's loss for a --optimizer method's Query (zoft.zo.methods): one forward, means over ranks,
    as float64 values on the host (what the step log records and the update reads), or (lazy) as the float64
    device tensor they come from, for an update queued before the host reads them."""
    rows = s.perturber.query_rows(query)
    losses = _mean_over_ranks(_row_fn(engine, s, batch, loss, golds)(rows), len(batch), True).double()
    return losses if lazy else losses.tolist()


def _row_fn(engine, s: Session, batch: list[Encoded], loss: str, golds, packed=None):
    """rows -> (P,) this rank's mean loss per row."""
    if loss == "f1":
        return lambda rows: f1_row_losses(s, batch, golds, rows)
    b = packed if packed is not None else pack_batch(engine, batch, loss)
    logits_only = loss == "candidate" and b.single_token
    return lambda rows: row_losses(engine.scores(b, rows, logits_only, graph=True), b, loss)


def _mean_over_ranks(v: torch.Tensor, n: int, reduce: bool) -> torch.Tensor:
    """(P,) local means over n examples -> global means (data parallel), or v as it is."""
    if not reduce or dist.world()[1] == 1:
        return v
    tot = dist.all_reduce_sum(torch.cat([v.double() * n, torch.full((1,), float(n), dtype=torch.float64, device=v.device)]))
    return tot[:-1] / tot[-1]


def gather_directions(seeds: list[int], lp: torch.Tensor, lm: torch.Tensor, grads: list[float], n: int,
                      world: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """--spread-directions: (L₊, L₋, g) of every rank's n directions, back in the order of `seeds` (all of
    the step's seeds; rank r estimated seeds[r::world])."""
    parts = dist.all_gather_floats(lp.tolist() + lm.tolist() + grads)
    order = sorted(((k * world + r, p[i], p[n + i], p[2 * n + i]) for r, p in enumerate(parts)
                    for k, i in enumerate(range(n))))
    return torch.tensor([o[1] for o in order]), torch.tensor([o[2] for o in order]), [o[3] for o in order]


def clip(grads: torch.Tensor | list[float], c: float) -> torch.Tensor | list[float]:
    """--clip-grad: g clamped to [−c, c]; ±inf and NaN stay (the guard rejects them)."""
    if torch.is_tensor(grads):
        return torch.where(grads.isfinite(), grads.clamp(-c, c), grads)
    return [min(max(x, -c), c) if math.isfinite(x) else x for x in grads]


@dataclass
class StepResult:
    """One estimated step on its way to the guard. values: L₊ (n), L₋ (n), g (n) and, data parallel, the
    stop flag every rank agreed on: a HostCopy still in flight (pipelined) or floats on the host.
    snap (pipelined): the parameters before the step's update, which is already queued."""

    step: int
    seeds: list[int]
    lr: float
    t: float  # when it was queued
    values: HostCopy | list[float]
    snap: torch.Tensor | None = None
    queued: bool = False
    query: object = None  # a --optimizer method's step (zoft.zo.methods.Query); values: the row losses + flag
    snap_state: dict | None = None  # (pipelined method step) the method's state before its queued update

    def read(self) -> tuple[list[float], list[float], list[float], int]:
        """(L₊, L₋, g, the signal some rank got or 0); waits for this step's copy alone."""
        vals = self.values.read() if isinstance(self.values, HostCopy) else self.values
        if self.query is not None:  # a method's step: (row losses, -, -, flag)
            P = len(self.query.dir)
            return vals[:P], [], [], int(vals[P]) if len(vals) > P else 0
        n = len(self.seeds)
        return vals[:n], vals[n : 2 * n], vals[2 * n : 3 * n], int(vals[3 * n]) if len(vals) > 3 * n else 0
