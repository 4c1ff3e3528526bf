"""Pick the comparison's arms from a learning-rate sweep: each method's best rate, then ZO-SGD and the best others.

    python bench/pick_methods.py RUNS_DIR --prefix sweep_ --out PICKED.json [--arms 3] [--steps-scale 2]

Reads every RUNS_DIR/PREFIX* run of `zoft train` (zoft_config.json, results.json), keeps each method's rate with
the highest best-dev score (ties: the smaller rate; ZO-SGD with n > 1 directions counts as its own method,
"zo-sgd×n"), ranks the methods by that score, and writes PICKED.json:
`arm0` is ZO-SGD at its best rate, `arm1` … the best other methods, each as `zoft train` flags (the optimizer,
its rate and method flags, and --steps = the sweep's steps × --steps-scale), plus `sweep`, the table printed
here. bench/device_run.py's `rt-compare` recipe fills its `{arm0}` … placeholders from that file, so a sweep
and the comparison it chooses can run in back-to-back calls without a person choosing in between.
Only the standard library: runs where the sweep ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# the flags a method's arm carries besides --optimizer and --lr (the sweep's own, read back from its config)
CARRIED = {"directions": "--directions", "clip_grad": "--clip-grad", "hizoo_alpha": "--hizoo-alpha",
           "lozo_rank": "--lozo-rank", "lozo_interval": "--lozo-interval", "sparsity": "--sparsity",
           "momentum": "--momentum", "cone_angle": "--cone-angle"}
METHOD_FLAGS = {"zo-sgd": ("directions", "clip_grad"), "fzoo": ("directions",), "hizoo": ("directions", "hizoo_alpha"),
                "zo-adam": ("directions", "momentum"), "zo-momentum": ("momentum",), "lozo": ("lozo_rank", "lozo_interval"),
                "sparse-mezo": ("sparsity",), "conmezo": ("momentum", "cone_angle"), "zo-sign": ()}


def read_sweep(runs: Path, prefix: str) -> list[dict]:
    rows = []
    for d in sorted(runs.glob(f"{prefix}*")):
        if not (d / "zoft_config.json").is_file():
            continue
        cfg = json.loads((d / "zoft_config.json").read_text())
        res = json.loads((d / "results.json").read_text()) if (d / "results.json").is_file() else {}
        zo = cfg.get("zo", {})
        score = res.get("best_dev_accuracy", res.get("best_dev_f1"))
        rows.append({"run": d.name, "method": zo.get("optimizer"), "lr": zo.get("lr"), "steps": cfg["run"]["steps"],
                     "dev": score, "final": res.get("final_accuracy", res.get("final_f1")),
                     "s_per_step": res.get("seconds_per_step"), "zo": zo})
    return rows


def arm_key(r: dict) -> str:
    """What competes for an arm: the method, and ZO-SGD with n > 1 directions (MeZO's n-direction estimate, all n
    in one batched forward) apart from plain ZO-SGD, as "zo-sgd×n"."""
    n = r["zo"].get("directions") or 1
    return f"zo-sgd×{n}" if r["method"] == "zo-sgd" and n > 1 else r["method"]


def pick(rows: list[dict], n_arms: int, steps_scale: float) -> dict:
    best: dict[str, dict] = {}
    for r in rows:
        if r["dev"] is None:
            continue
        b = best.get(arm_key(r))
        if b is None or (r["dev"], -r["lr"]) > (b["dev"], -b["lr"]):
            best[arm_key(r)] = r
    if "zo-sgd" not in best:
        raise SystemExit("pick_methods: no finished zo-sgd run in the sweep (results.json with a dev score)")
    others = sorted((m for m in best if m != "zo-sgd"), key=lambda m: -best[m]["dev"])
    out = {"sweep": rows, "best": {m: {k: best[m][k] for k in ("lr", "dev", "run")} for m in best}}
    for i, m in enumerate(["zo-sgd", *others][:n_arms]):
        r = best[m]
        flags = [] if r["method"] == "zo-sgd" else ["--optimizer", m]
        flags += ["--lr", f"{r['lr']:g}", "--steps", str(int(r["steps"] * steps_scale))]
        for f in METHOD_FLAGS.get(r["method"], ()):
            v = r["zo"].get(f)
            if v is not None and not (f == "clip_grad" and not v):
                flags += [CARRIED[f], f"{v:g}" if isinstance(v, float) else str(v)]
        out[f"arm{i}"] = " ".join(flags)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("--prefix", default="sweep_")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--arms", type=int, default=3, help="ZO-SGD and the best (arms − 1) other methods")
    ap.add_argument("--steps-scale", type=float, default=2.0)
    ns = ap.parse_args(argv)
    rows = read_sweep(ns.runs, ns.prefix)
    print("| run | method | lr | steps | best dev | test | s/step (shared GPU) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r['method']} | {r['lr']:g} | {r['steps']} | {r['dev']} | {r['final']} | {r['s_per_step']} |")
    picked = pick(rows, ns.arms, ns.steps_scale)
    ns.out.write_text(json.dumps(picked, indent=1))
    for i in range(ns.arms):
        if f"arm{i}" in picked:
            print(f"arm{i}: {picked[f'arm{i}']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
