"""The write-ahead step log: a whole ZO run is its base weights plus kilobytes of (seed, g, lr).

``RUN_DIR/steps.jsonl`` starts with a header (the resolved config) and gets one record per step,
written *before* the step's update is applied, flushed every step and fsynced every N steps:

    {"step": 12, "seeds": [...], "grads": [...], "lr": 0.005, "loss": 0.61}
    {"step": 40, "revert_to": 38, "reason": "..."}      # the divergence guard undid updates past 38

``effective`` turns the log into the list of updates that the parameters hold; ``apply`` replays
records with exactly the floating-point operations training performed, so a replay is bitwise equal.
"""

from __future__ import annotations

import json
import os

from zoft.zo import Trainable, perturb_, sgd_update_


class StepLog:
    def __init__(self, path: str, header: dict | None, fsync_every: int = 50, fresh: bool = False):
        """fresh: a new run, so a log left by an earlier start that never checkpointed is replaced."""
        self.path = path
        fresh = fresh or not os.path.exists(path) or os.path.getsize(path) == 0
        if not fresh:
            _truncate_partial_tail(path)
        self.f = open(path, "w" if fresh else "a")
        self.fsync_every = fsync_every
        self.n = 0
        if fresh and header is not None:
            self.write({"header": header})
            self.sync()

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        self.n += 1
        if self.fsync_every and self.n % self.fsync_every == 0:
            os.fsync(self.f.fileno())

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        if not self.f.closed:
            self.sync()
            self.f.close()


def _truncate_partial_tail(path: str) -> None:
    """A kill mid-write can leave half a line: drop it (that step never reached its update)."""
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)


def read(path: str) -> tuple[dict | None, list[dict]]:
    header, records = None, []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # partial tail
            r = json.loads(line)
            if "header" in r:
                header = r["header"]
            else:
                records.append(r)
    return header, records


def effective(records: list[dict]) -> list[dict]:
    """The updates the parameters hold, in order: reverts drop the updates past their point."""
    applied: list[dict] = []
    for r in records:
        if "revert_to" in r:
            del applied[r["revert_to"] :]
        else:
            applied.append(r)
    return applied


def next_step(records: list[dict]) -> int:
    return max((r["step"] for r in records), default=-1) + 1


def apply(tr: Trainable, r: dict, perturbed: str, eps: float, weight_decay: float) -> None:
    """Repeat one logged step's parameter arithmetic (no forward passes). perturbed: how the step
    evaluated L(θ ± εz), "rows" (θ untouched) or "inplace" (session.full_step)."""
    if perturbed == "inplace":  # +ε, −2ε, +ε passes over θ leave rounding that replay must repeat
        for s in r["seeds"]:
            perturb_(tr, s, eps)
            perturb_(tr, s, -2 * eps)
            perturb_(tr, s, eps)
    sgd_update_(tr, r["seeds"], r["grads"], r["lr"], weight_decay)
