"""The write-ahead step log: a whole ZO run is its base weights plus kilobytes of (seed, g, lr).

``RUN_DIR/steps.jsonl`` starts with a header (the resolved config) and gets one record per step,
written *before* the step's update is applied, flushed every step and fsynced every N steps:

    {"step": 12, "seeds": [...], "grads": [...], "lr": 0.005, "loss": 0.61}
    {"step": 12, ..., "losses": [...]}                  # --optimizer methods: every row's loss, for replay
    {"step": 40, "revert_to": 38, "reason": "..."}      # the divergence guard undid updates past 38

``effective`` turns the log into the list of updates that the parameters hold; ``apply`` replays
records with exactly the floating-point operations training performed, so a replay is bitwise equal.
"""

from __future__ import annotations

import json
import math
import os

from zoft.errors import ZoftError
from zoft.zo.trainable import Trainable, perturb_
from zoft.zo.update import sgd_update_


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


def _whole_lines_end(data: bytes) -> int:
    """Where the log's whole lines end. What a crash leaves after them is dropped: half a line (killed
    mid-write) and a NUL-filled tail (a file extended by the filesystem before its data reached the disk)."""
    body = data.rstrip(b"\0")
    if len(body) < len(data):  # the NULs may have eaten the last lines' newlines too: keep whole lines only
        body = body.rstrip(b"\n\0")
        if len(body) < len(data) and data[len(body) : len(body) + 1] == b"\n":
            return len(body) + 1
    return body.rfind(b"\n") + 1


def _truncate_partial_tail(path: str) -> None:
    """Drop a torn or NUL tail before appending (those steps never reached their update)."""
    with open(path, "rb+") as f:
        data = f.read()
        end = _whole_lines_end(data)
        if end != len(data):
            f.truncate(end)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


def _problem(r, n: int, prev_step: int, held: int) -> str | None:
    """What is wrong with record `r` on line n (None: nothing), given the step before it and the updates held."""
    if not isinstance(r, dict):
        return f"a JSON {type(r).__name__}, not an object"
    if "header" in r:
        return None if n == 1 and isinstance(r["header"], dict) else "a header line that is not the first line"
    if not _is_int(r.get("step")) or r["step"] <= prev_step:
        return f"step {r.get('step')!r} after step {prev_step} (steps only go up: two writers, or a spliced log?)"
    if "revert_to" in r:
        ok = _is_int(r["revert_to"]) and 0 <= r["revert_to"] <= held
        return None if ok else f"revert_to {r['revert_to']!r} with {held} updates held"
    seeds, grads = r.get("seeds"), r.get("grads")
    if not (isinstance(seeds, list) and seeds and all(_is_int(x) for x in seeds)):
        return "no list of integer 'seeds'"
    if not (isinstance(grads, list) and len(grads) == len(seeds) and all(_is_num(x) for x in grads)):
        return f"'grads' is not a list of {len(seeds)} finite numbers"
    if not _is_num(r.get("lr")):
        return f"'lr' is {r.get('lr')!r}, not a finite number"
    losses = r.get("losses", [])
    if not (isinstance(losses, list) and all(_is_num(x) for x in losses)):
        return "'losses' is not a list of finite numbers"
    return None


def read(path: str) -> tuple[dict | None, list[dict]]:
    """(header, records) of a step log. A torn or NUL tail is ignored; any other damaged line is a ZoftError
    naming the line and the last good step, since replaying around a hole would silently mix two runs."""
    with open(path, "rb") as f:
        data = f.read()
    header, records, held, prev = None, [], 0, -1
    lines = data[: _whole_lines_end(data)].split(b"\n")[:-1]
    for n, line in enumerate(lines, start=1):
        try:
            r = json.loads(line)
            why = _problem(r, n, prev, held)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            why = f"not JSON ({e})"
        if why:
            last = f"step {prev}" if prev >= 0 else "none (no step before it)"
            raise ZoftError(
                f"step log {path} is damaged at line {n} of {len(lines)}: {why}; the last good record is {last}. "
                f"To use the log up to there, keep its first {n - 1} lines (head -n {n - 1} {path} > fixed.jsonl, "
                "then move fixed.jsonl in its place): replay rebuilds those steps, and --resume recomputes the "
                "rest when the checkpoint is not past them")
        if "header" in r:
            header = r["header"]
            continue
        held = min(held, r["revert_to"]) if "revert_to" in r else held + 1
        prev = r["step"]
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


def apply(tr: Trainable, r: dict, perturbed: str, eps: float, weight_decay: float, method=None) -> None:
    """Repeat one logged step's parameter arithmetic (no forward passes). perturbed: how the step
    evaluated L(θ ± εz), "rows" (θ untouched) or "inplace" (session.full_step). method: the run's
    --optimizer method (zoft.zo.methods), which redoes its update and state from the record's row losses."""
    if method is not None:
        if "losses" not in r:
            raise ZoftError(f"the step log's record of step {r['step']} has no row losses: it was written by a zo-sgd "
                            f"run, which --optimizer {method.name} can't replay; pass the run's own --optimizer")
        method.replay_(tr, r, eps, weight_decay)
        return
    if perturbed == "inplace":  # +ε, −2ε, +ε passes over θ leave rounding that replay must repeat
        for s in r["seeds"]:
            perturb_(tr, s, eps)
            perturb_(tr, s, -2 * eps)
            perturb_(tr, s, eps)
    sgd_update_(tr, r["seeds"], r["grads"], r["lr"], weight_decay)
