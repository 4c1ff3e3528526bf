"""`zoft plot RUN_DIR [RUN_DIR…]`: training loss and dev accuracy curves of several runs on one figure."""

from __future__ import annotations

import json
import os

from zoft.errors import ZoftError

AXES = {"steps": ("step", "step"), "forwards": ("forwards", "forward passes"),
        "seconds": ("train_seconds", "training seconds")}


def read_rows(run_dir: str) -> list[dict]:
    """metrics.jsonl's rows (a run killed mid-write leaves a half line at the end: dropped)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ZoftError(f"{run_dir} has no metrics.jsonl; pass the --output-dir of a zoft train run")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if not line.endswith("\n"):
                    break
                raise ZoftError(f"{path}:{n} is not JSON; the metrics file is damaged") from None
    return rows


def x_of(row: dict, x: str, path: str) -> float:
    """A step row's x. Training seconds exclude model loading, evaluations and checkpoints; runs from
    before they were logged fall back to the seconds since the run started."""
    key = AXES[x][0]
    if key in row:
        return row[key]
    if x == "seconds" and "seconds" in row:
        return row["seconds"]
    raise ZoftError(f"{path} has no {key!r} in its step rows (an older run); use --x steps")


def read_metrics(run_dir: str, x: str = "steps") -> tuple[list, list, list, list, str]:
    """(x of each step, its loss, x of each dev evaluation, its score, the dev metric's name: accuracy or f1);
    x: steps, forwards or seconds (of training)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    at, xs, losses, dsteps, dev, name = {}, [], [], [], [], ""
    for r in read_rows(run_dir):
        if "loss" in r:
            at[r["step"]] = x_of(r, x, path)
            xs.append(at[r["step"]])
            losses.append(r["loss"])
        dkey = next((k for k in r if k.startswith("dev_")), None)  # dev_accuracy or dev_f1
        if dkey and r["step"] in at:  # an evaluation sits at the x of the step it follows
            dsteps.append(at[r["step"]])
            dev.append(r[dkey])
            name = dkey.removeprefix("dev_")
    return xs, losses, dsteps, dev, name


def smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(run_dirs: list[str], output: str, window: int = 20, x: str = "steps") -> str:
    if x not in AXES:
        raise ZoftError(f"--x {x!r}: expected one of {', '.join(AXES)}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ZoftError("zoft plot needs matplotlib: pip install matplotlib") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = set()
    for d in run_dirs:
        steps, losses, dsteps, dev, name = read_metrics(d, x)
        label = os.path.basename(os.path.normpath(d))
        ax1.plot(steps, smooth(losses, window), label=label)
        if dev:
            names.add(name)
            ax2.plot(dsteps, dev, marker="o", label=label)
    ax1.set(xlabel=AXES[x][1], ylabel=f"training loss (moving average of {window})", title="loss")
    metric = " / ".join(sorted(names)) or "accuracy"  # what the runs measured: accuracy, or F1 for generation
    ax2.set(xlabel=AXES[x][1], ylabel=f"dev {metric}", title=f"dev {metric}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
