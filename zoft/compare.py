"""`zoft compare RUN_DIR…`: runs side by side at equal steps, forward passes and training seconds.

Runs that differ only in their seed form one arm. For each arm and threshold: the steps, forward rows and
training seconds each run needed to first score at least the threshold at an evaluation (on the test
curve when every run scored test at its evaluations, `zoft train --eval-test`; else on dev), averaged
over the runs that got there; then the final score (the best dev checkpoint on test, results.json), the
optimizer's state, seconds per step and peak memory. Comparing methods at equal steps alone hides the
extra forwards of the multi-query ones; these columns show the other two axes.

Training seconds are metrics.jsonl's `train_seconds`: the loop's time without evaluations and saves, summed
over a resumed run's processes. Runs that shared a GPU ran slower than alone, and their seconds say so.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from zoft.errors import ZoftError
from zoft.plot import read_rows

ARM_FIELDS = {"model": ("model", "dtype"), "task": ("task", "n_train", "template"), "run": ("steps",)}


@dataclass
class RunCurve:
    """One run: its arm's settings, its evaluations and its results."""

    path: str
    arm: dict
    seed: int
    evals: list[tuple[int, float]]  # (step, score) of each evaluation on the compared split
    at_step: dict[int, dict]  # step → its metrics row (forwards, train_seconds)
    results: dict = field(default_factory=dict)

    def first_reaching(self, threshold: float) -> tuple[int, float | None, float | None] | None:
        """(steps, forwards, training seconds) at the first evaluation scoring ≥ threshold, or None."""
        for step, score in self.evals:
            if score >= threshold:
                row = self.at_step.get(step, {})
                return step, row.get("forwards"), row.get("train_seconds")
        return None


def read_run(run_dir: str, split: str) -> RunCurve:
    cfg_path = os.path.join(run_dir, "zoft_config.json")
    if not os.path.isfile(cfg_path):
        raise ZoftError(f"{run_dir} has no zoft_config.json; pass the --output-dir of a zoft train run")
    with open(cfg_path) as f:
        cfg = json.load(f)
    arm = dict(cfg.get("zo", {}))
    for section, names in ARM_FIELDS.items():
        arm |= {n: cfg.get(section, {}).get(n) for n in names}
    evals, at_step = [], {}
    for r in read_rows(run_dir):
        if "loss" in r:
            at_step[r["step"]] = r
        key = next((k for k in r if k.startswith(f"{split}_")), None)
        if key is not None:
            evals.append((r["step"], r[key]))
    results = {}
    if os.path.isfile(os.path.join(run_dir, "results.json")):
        with open(os.path.join(run_dir, "results.json")) as f:
            results = json.load(f)
    return RunCurve(run_dir, arm, cfg.get("run", {}).get("seed", 0), evals, at_step, results)


def has_test_curve(run_dir: str) -> bool:
    return any(k.startswith("test_") for r in read_rows(run_dir) for k in r)


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)


def arms(runs: list[RunCurve]) -> list[tuple[str, list[RunCurve]]]:
    """Runs grouped by their settings but the seed, each group labelled by the settings that tell it apart."""
    groups: dict[str, list[RunCurve]] = {}
    for r in runs:
        groups.setdefault(json.dumps(r.arm, sort_keys=True, default=str), []).append(r)
    keys = sorted({k for r in runs for k in r.arm})
    differ = [k for k in keys if len({json.dumps(g[0].arm.get(k), default=str) for g in groups.values()}) > 1]
    out = []
    for g in groups.values():
        shown = [k for k in differ if k != "optimizer"]
        label = " ".join([str(g[0].arm.get("optimizer"))] + [f"{k}={g[0].arm.get(k)}" for k in shown])
        out.append((label, sorted(g, key=lambda r: r.seed)))
    return out


def summarize(label: str, runs: list[RunCurve], thresholds: list[float]) -> dict:
    """One arm's row: per threshold the mean steps / forwards / seconds of the runs that reached it."""
    row = {"arm": label, "runs": len(runs), "seeds": [r.seed for r in runs]}
    for t in thresholds:
        hits = [h for r in runs if (h := r.first_reaching(t)) is not None]
        row[f"reached_{t:g}"] = len(hits)
        for i, name in enumerate(("steps", "forwards", "seconds")):
            vals = [h[i] for h in hits if h[i] is not None]
            row[f"{name}_to_{t:g}"] = sum(vals) / len(vals) if vals and len(vals) == len(hits) else None
    finals = [v for r in runs if (v := r.results.get("final_accuracy", r.results.get("final_f1"))) is not None]
    row["final"], row["final_std"] = mean_std(finals) if finals else (None, None)
    row["finished"] = len(finals)
    for key in ("optimizer_state_bytes", "seconds_per_step", "peak_memory_mb"):
        vals = [r.results[key] for r in runs if r.results.get(key) is not None]
        row[key] = sum(vals) / len(vals) if vals else None
    return row


def compare(run_dirs: list[str], thresholds: list[float], split: str = "auto") -> tuple[str, list[dict]]:
    """(the split compared, one row per arm)."""
    if not run_dirs:
        raise ZoftError("zoft compare needs at least one run folder")
    if split == "auto":
        split = "test" if all(has_test_curve(d) for d in run_dirs) else "dev"
    elif split not in ("dev", "test"):
        raise ZoftError(f"--split {split!r}: expected dev, test or auto")
    runs = [read_run(d, split) for d in run_dirs]
    empty = [r.path for r in runs if not r.evals]
    if empty:
        raise ZoftError(f"{empty[0]} has no {split} evaluations in metrics.jsonl; train with --eval-every N"
                        + (" --eval-test, or pass --split dev" if split == "test" else ""))
    return split, [summarize(label, g, thresholds) for label, g in arms(runs)]


def fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def table(split: str, rows: list[dict], thresholds: list[float]) -> str:
    """The rows as a Markdown table (docs/results.md's comparison tables are printed by this)."""
    head = ["arm", "runs"]
    for t in thresholds:
        head += [f"steps to {t:g}", f"forwards to {t:g}", f"seconds to {t:g}"]
    head += ["final test", "state MiB", "s/step", "peak MiB"]
    lines = [f"threshold on the {split} curve; 'k/n': only k of the n runs reached it (means over those k)",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["arm"], str(r["runs"])]
        for t in thresholds:
            k = r[f"reached_{t:g}"]
            note = "" if k == r["runs"] else f" ({k}/{r['runs']})"
            cells += [fmt(r[f"steps_to_{t:g}"], ".0f") + note, fmt(r[f"forwards_to_{t:g}"], ".0f"),
                      fmt(r[f"seconds_to_{t:g}"], ".1f")]
        final = "–" if r["final"] is None else f"{r['final']:.3f} ± {r['final_std']:.3f}"
        if r["final"] is not None and r["finished"] < r["runs"]:
            final += f" ({r['finished']}/{r['runs']})"
        state = None if r["optimizer_state_bytes"] is None else r["optimizer_state_bytes"] / 2**20
        cells += [final, fmt(state, ".2f"), fmt(r["seconds_per_step"], ".4f"),
                  fmt(r["peak_memory_mb"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_thresholds(text: str) -> list[float]:
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ZoftError(f"--thresholds {text!r}: expected numbers separated by commas, e.g. 0.80,0.84") from None
    if not out or any(not math.isfinite(x) for x in out):
        raise ZoftError(f"--thresholds {text!r}: expected finite numbers separated by commas, e.g. 0.80,0.84")
    return out
