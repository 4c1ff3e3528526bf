"""`zoft plot RUN_DIR [RUN_DIR…]`: training loss and dev accuracy curves of several runs on one figure."""

from __future__ import annotations

import json
import os

from zoft.errors import ZoftError

AXES = {"steps": ("step", "step"), "forwards": ("forwards", "forward passes"), "seconds": ("seconds", "seconds")}


def read_metrics(run_dir: str, x: str = "steps") -> tuple[list, list, list, list, str]:
    """(x of each step, its loss, x of each dev evaluation, its score, the dev metric's name: accuracy or f1);
    x: steps, forwards or seconds."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ZoftError(f"{run_dir} has no metrics.jsonl; pass the --output-dir of a zoft train run")
    key = AXES[x][0]
    at, xs, losses, dsteps, dev, name = {}, [], [], [], [], ""
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            try:
                r = json.loads(line)
            except ValueError:
                if not line.endswith("\n"):
                    break  # a run killed mid-write: its last line is half there
                raise ZoftError(f"{path}:{n} is not JSON; the metrics file is damaged") from None
            if "loss" in r:
                if key not in r:
                    raise ZoftError(f"{path} has no {key!r} in its step rows (an older run); use --x steps")
                at[r["step"]] = r[key]
                xs.append(r[key])
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
