"""The divergence guard: a step whose loss is not finite, or spikes far above the running median, is
rejected; the update before it (the suspect) is undone exactly, the learning rate is scaled down, and
the run goes on from the step after the rejected one. Too many strikes stop the run with a checkpoint."""

from __future__ import annotations

import math
import statistics


class Guard:
    """The window of recent accepted losses, the strikes so far and the lr scale they brought; the decision
    on each step's loss. Its state travels in the checkpoint, so --resume continues the same guard."""

    def __init__(self, threshold: float, strikes_allowed: int, lr_factor: float, state: dict | None = None):
        """state: a checkpoint's (its "guard", "lr_scale" and "stopped" entries); a stopped run's --resume
        starts with fresh strikes (it may have lowered --lr)."""
        state = state or {}
        kept = state.get("guard", {})
        self.threshold, self.strikes_allowed, self.lr_factor = threshold, strikes_allowed, lr_factor
        self.recent: list[float] = list(kept.get("recent", []))
        self.strikes: int = 0 if state.get("stopped") else kept.get("strikes", 0)
        self.lr_scale: float = state.get("lr_scale", 1.0)

    def verdict(self, loss: float, grads: list[float]) -> str | None:
        """Why the step with this mean loss and these projected gradients is rejected; None: accept it."""
        if not all(math.isfinite(x) for x in grads + [loss]):
            return "non-finite loss"
        if self.threshold > 0 and len(self.recent) >= 20 and loss > self.threshold * statistics.median(self.recent[-100:]):
            return f"loss {loss:.4g} > {self.threshold}× running median"
        return None

    def accept(self, loss: float) -> None:
        self.recent.append(loss)

    def strike(self, undoing: bool) -> bool:
        """Count a rejected step (undoing: an update before it is undone, so the lr goes down). True: stop the
        run (too many strikes, or nothing to undo)."""
        self.strikes += 1
        if undoing:
            self.lr_scale *= self.lr_factor
        return self.strikes > self.strikes_allowed or not undoing

    def replay_strike(self, lr_scale: float) -> bool:
        """A strike the step log recorded (--resume), with the lr scale it left. True: the run stopped there."""
        self.strikes, self.lr_scale = self.strikes + 1, lr_scale
        return self.strikes > self.strikes_allowed

    def state(self) -> dict:
        """What a checkpoint keeps of the guard (beside the loop's own counters)."""
        return {"lr_scale": self.lr_scale, "guard": {"recent": self.recent[-100:], "strikes": self.strikes}}

    def stop_message(self, why: str, step: int, ckpt: str) -> str:
        return (f"{why} at step {step + 1} ({self.strikes} strike(s)); the parameters before it are in {ckpt}: "
                "continue with --resume and a lower --lr (every other flag as it was)")
