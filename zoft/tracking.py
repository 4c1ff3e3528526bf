"""Where a run's metrics go besides metrics.jsonl: --report-to tensorboard|wandb|trackio, and API callbacks.

Every row written to metrics.jsonl passes through `Reporters.log`: training rows (step, loss, lr, forwards,
seconds, ...) go to `Callback.on_log` and to the trackers under "train/"; dev rows (a `dev_*` key) go to
`Callback.on_evaluate` and under "eval/". The trackers are the libraries' own writers, never files by hand.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

from zoft.errors import ZoftError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


class Callback:
    """Subclass and override what you need; each method gets the metrics.jsonl row as a dict."""

    def on_log(self, row: dict) -> None:
        """A training step's row: step, loss, projected_grad, lr, forwards, seconds, step_seconds."""

    def on_evaluate(self, row: dict) -> None:
        """A dev evaluation's row: step, dev_accuracy or dev_f1, and the trained parameters' norms."""


def check(report_to: Sequence[str]) -> list[str]:
    """The trackers asked for, each importable (checked before the model loads)."""
    kinds = [k for k in report_to if k != "none"]
    for k in kinds:
        if importlib.util.find_spec(PACKAGES[k]) is None:
            raise ZoftError(f"--report-to {k} needs the {PACKAGES[k]} package: pip install {PACKAGES[k]}")
    return kinds


def is_eval(row: dict) -> bool:
    return any(k.startswith("dev_") for k in row)


class Reporters:
    """The trackers of --report-to and the API's callbacks, fed every metrics row."""

    def __init__(self, report_to: Sequence[str], out: str, config: dict, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)
        self.tb = self.wandb = self.trackio = None
        name = os.path.basename(os.path.normpath(out))
        for kind in check(report_to):
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out, "tensorboard"))
            elif kind == "wandb":
                import wandb

                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "zoft"), name=name,
                                        dir=out, config=config, reinit="finish_previous")
            else:
                import trackio

                trackio.init(project=os.environ.get("TRACKIO_PROJECT", "zoft"), name=name, config=config)
                self.trackio = trackio

    def log(self, row: dict) -> None:
        ev = is_eval(row)
        for cb in self.callbacks:
            (cb.on_evaluate if ev else cb.on_log)(row)
        step = row["step"]
        scalars = {f"{'eval' if ev else 'train'}/{k.removeprefix('dev_')}": v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.trackio is not None:
            self.trackio.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.trackio is not None:
            self.trackio.finish()
