"""The full suite on one model and task: zero-shot, MeZO-LoRA and MeZO full-parameter, with a summary table.

    python examples/mezo_lora_opt125m_suite.py                # facebook/opt-125m on IMDB
    python examples/mezo_lora_opt125m_suite.py --model /path/to/opt-125m --task rotten_tomatoes --steps 200

Measured, per run: test accuracy, wall seconds (load + zero-shot + training + test eval), seconds per
training step, and the share of forward work (token x layer) the engine saved over a naive two-pass
MeZO step. The zero-shot accuracy comes from the LoRA run's evaluation before its first step. Each
run goes to its own folder under --output-dir; the table is printed in markdown, written to
summary.json, and the last line printed is the same summary as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from zoft.config import ModelConfig, RunConfig, TaskConfig, TrainConfig, ZOConfig
from zoft.errors import ZoftError

OFFLINE_HINT = "offline? pass --model /path/to/local/model and --task rotten_tomatoes, or --data-dir"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="facebook/opt-125m", help="hub id or local Hugging Face folder")
    p.add_argument("--task", default="imdb", help="built-in task (imdb, sst2, rotten_tomatoes) or a .jsonl")
    p.add_argument("--data-dir", default="", help="local copy of the dataset (see `zoft train --help`)")
    p.add_argument("--steps", type=int, default=500, help="MeZO steps, for each of the two runs")
    p.add_argument("--output-dir", default="runs/mezo_opt125m_suite", help="a folder per run, summary.json")
    p.add_argument("--lr", type=float, default=0.0, help="LoRA learning rate; 0: zoft's default (1e-4)")
    p.add_argument("--full-lr", type=float, default=0.0, help="full-parameter lr; 0: zoft's (1e-6)")
    p.add_argument("--layers", default="", help="blocks the full run trains, e.g. 'top4'; empty: all")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=100, help="dev evaluation (best checkpoint); 0: never")
    p.add_argument("--max-length", type=int, default=0, help="tokens per example; 0: the model's limit")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--resume", action="store_true", help="continue each run that has a checkpoint")
    return p.parse_args(argv)


def run_config(a: argparse.Namespace, name: str, zo: ZOConfig, zero_shot: bool) -> TrainConfig:
    out = os.path.join(a.output_dir, name)
    return TrainConfig(
        ModelConfig(model=a.model, device=a.device, max_length=a.max_length),
        TaskConfig(task=a.task, data_dir=a.data_dir, n_train=a.n_train, n_dev=a.n_dev, n_test=a.n_test),
        zo,
        RunConfig(steps=a.steps, output_dir=out, eval_every=a.eval_every if a.n_dev else 0,
                  zero_shot=zero_shot, resume=a.resume and os.path.isdir(os.path.join(out, "checkpoint"))),
    )


def row(name: str, result: dict) -> dict:
    with open(os.path.join(result["output_dir"], "zoft_config.json")) as f:
        resolved = json.load(f)["resolved"]
    return {"run": name, "accuracy": result.get("final_accuracy"), "seconds": result["seconds"],
            "seconds_per_step": result["seconds_per_step"], "work_saved": result["work_saved"],
            "trainable_parameters": resolved["trainable_parameters"], "lr": resolved["lr"],
            "output_dir": result["output_dir"]}


def run_suite(a: argparse.Namespace) -> dict:
    from zoft.train.loop import train  # imports torch: after --help has had its chance

    lora = train(run_config(a, "lora", ZOConfig(mode="lora", lr=a.lr, batch_size=a.batch_size), True))
    full = train(run_config(a, "full", ZOConfig(mode="full", lr=a.full_lr, layers=a.layers,
                                                 batch_size=a.batch_size), False))
    zero = {"run": "zero-shot", "accuracy": lora["zero_shot_accuracy"], "trainable_parameters": 0,
            **dict.fromkeys(("seconds", "seconds_per_step", "work_saved", "lr", "output_dir"))}
    full_name = f"mezo-full ({a.layers})" if a.layers else "mezo-full"
    return {"model": a.model, "task": a.task, "steps": a.steps, "path": lora["path"],
            "runs": [zero, row("mezo-lora", lora), row(full_name, full)]}


def table(summary: dict) -> str:
    cell = lambda v, f: "-" if v is None else format(v, f)
    lines = ["| run | test accuracy | wall s | s/step | work saved | trained params |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in summary["runs"]:
        lines.append(f"| {r['run']} | {cell(r['accuracy'], '.3f')} | {cell(r['seconds'], '.1f')} | "
                     f"{cell(r['seconds_per_step'], '.3f')} | {cell(r['work_saved'], '.1%')} | "
                     f"{r['trainable_parameters']:,} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    from zoft.errors import Interrupted  # imports torch: after --help has had its chance

    try:
        summary = run_suite(a)
    except Interrupted as e:  # Ctrl-C: the current run saved a checkpoint, --resume continues
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.code)
    except ZoftError as e:
        msg = str(e)
        hint = f"; {OFFLINE_HINT}" if "hub" in msg and "rotten_tomatoes" not in msg else ""
        print(f"error: {msg}{hint}", file=sys.stderr)
        sys.exit(2)
    with open(os.path.join(a.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{a.model} on {a.task}, {a.steps} steps per run ({summary['path']} path)\n")
    print(table(summary))
    print(f"\nsummary: {os.path.join(a.output_dir, 'summary.json')}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
