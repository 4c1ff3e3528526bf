"""What the pipelined loop needs to keep the GPU busy: a copy of a step's small results on its way to the
host, and the copy of the LoRA parameters taken before an update so that it can be undone.
"""

from __future__ import annotations

import torch

from zoft.session import Session


def snapshot(s: Session) -> torch.Tensor | None:
    """LoRA parameters are small: keep a flat copy before each update so the guard can undo it exactly."""
    if s.loras is None:
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
