"""What the pipelined loop needs to keep the GPU busy: which steps it pipelines, a copy of a step's small
results on its way to the host, and the copy of the LoRA parameters taken before an update so that it can
be undone (full mode's undo is the checkpoint and the step log: zoft.train.checkpoint.rewind).
"""

from __future__ import annotations

import torch

from zoft.session import Session


def pipelines(s: Session) -> bool:
    """Whether the loop may queue this session's updates before reading their losses: the steps that leave
    θ untouched until the update (LoRA and prefix rows, full mode's rows). MeZO's in-place passes are kept
    synchronous."""
    return s.trainable.flat or s.full_step == "rows"


def snapshot(s: Session) -> torch.Tensor | None:
    """LoRA (and prefix) parameters are small: keep a flat copy before each update so the guard can undo it exactly."""
    if not s.trainable.flat:
        return None
    return s.trainable.flat_values(copy=True)


class HostCopy:
    """A small device tensor on its way to the host: the copy starts now (pinned, asynchronous on CUDA),
    and read() waits for that copy alone, not for work queued after it."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            t = host
        self.host = t

    def read(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class Pipeline:
    """The one-deep pipeline of a LoRA or full-mode (rows) run. Step i's update is queued with g still on
    the device, and the host reads step i's losses while step i+1 runs, so nothing waits for the GPU
    between steps. A non-finite g makes the queued update a no-op; a rejected step (non-finite or a guard
    spike) goes back to the accepted updates before the suspect one (LoRA: the copy taken before it; full
    mode: the checkpoint and the logged updates), the updates queued since dropped, and the run goes on
    from the step after the rejected one: the same parameters as the synchronous loop, which checks before
    it updates. Every
    boundary (eval, save, log, signals, the end) first reads every queued step, so what is evaluated and
    saved is exactly the accepted updates. Not lazy (synchronous steps): each step is read at once."""

    def __init__(self, lazy: bool):
        self.lazy = lazy
        self.inflight: list = []  # steps (StepResult) whose losses the host has not read yet
        self.ahead: dict = {}  # ahead["packed"]: the next step's batch, packed while this step ran

    def push(self, result) -> None:
        self.inflight.append(result)

    def next_due(self, boundary: bool):
        """The oldest queued step if it must be read now (at a boundary every queued step must; else a
        lazy pipeline keeps one in flight); None otherwise."""
        if self.inflight and (boundary or len(self.inflight) > 1 or not self.lazy):
            return self.inflight.pop(0)
        return None

    def clear(self) -> None:
        """After a rejected step: the steps queued after it ran on parameters that no longer hold, and the
        batch packed ahead is for the step after the last one queued."""
        self.inflight.clear()
        self.ahead.clear()
