"""`zoft plot RUN_DIR [RUN_DIR…]`: training loss and dev accuracy curves of several runs on one figure."""

from __future__ import annotations

import json
import os

from zoft.errors import ZoftError


def read_metrics(run_dir: str) -> tuple[list, list, list, list, str]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ZoftError(f"{run_dir} has no metrics.jsonl; pass the --output-dir of a zoft train run")
    steps, losses, dsteps, dev, name = [], [], [], [], ""
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "loss" in r:
                steps.append(r["step"])
                losses.append(r["loss"])
            key = next((k for k in r if k.startswith("dev_")), None)  # dev_accuracy or dev_f1
            if key:
                dsteps.append(r["step"])
                dev.append(r[key])
                name = key.removeprefix("dev_")
    return steps, losses, dsteps, dev, name


def smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(run_dirs: list[str], output: str, window: int = 20) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ZoftError("zoft plot needs matplotlib: pip install matplotlib") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = set()
    for d in run_dirs:
        steps, losses, dsteps, dev, name = read_metrics(d)
        label = os.path.basename(os.path.normpath(d))
        ax1.plot(steps, smooth(losses, window), label=label)
        if dev:
            names.add(name)
            ax2.plot(dsteps, dev, marker="o", label=label)
    ax1.set(xlabel="step", ylabel=f"training loss (moving average of {window})", title="loss")
    metric = " / ".join(sorted(names)) or "accuracy"  # what the runs measured: accuracy, or F1 for generation
    ax2.set(xlabel="step", ylabel=f"dev {metric}", title=f"dev {metric}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
