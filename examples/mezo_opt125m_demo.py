"""A short MeZO-LoRA run on OPT-125m through the zoft library: the smallest script to start from.

    python examples/mezo_opt125m_demo.py                      # facebook/opt-125m on IMDB, 500 steps
    python examples/mezo_opt125m_demo.py --model /path/to/opt-125m --task rotten_tomatoes   # offline

It builds a zoft.config.TrainConfig, calls zoft.train.train, prints a short summary and then one JSON
line (the run's results) for scripts. Offline, point --model at a local folder and use the built-in
rotten_tomatoes task, or give IMDB's files with --data-dir.
"""

from __future__ import annotations

import argparse
import json
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
    p.add_argument("--steps", type=int, default=500, help="MeZO steps")
    p.add_argument("--output-dir", default="runs/mezo_opt125m_demo", help="metrics, checkpoint, adapter")
    p.add_argument("--lr", type=float, default=0.0, help="learning rate; 0: zoft's default (MeZO's 1e-4)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--n-dev", type=int, default=200)
    p.add_argument("--n-test", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=100, help="dev evaluation (best checkpoint); 0: never")
    p.add_argument("--max-length", type=int, default=0, help="tokens per example; 0: the model's limit")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--resume", action="store_true", help="continue from --output-dir's checkpoint")
    return p.parse_args(argv)


def build_config(a: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        ModelConfig(model=a.model, device=a.device, max_length=a.max_length),
        TaskConfig(task=a.task, data_dir=a.data_dir, n_train=a.n_train, n_dev=a.n_dev, n_test=a.n_test),
        ZOConfig(mode="lora", lr=a.lr, batch_size=a.batch_size),
        RunConfig(steps=a.steps, output_dir=a.output_dir, eval_every=a.eval_every if a.n_dev else 0,
                  resume=a.resume),
    )


def fmt(acc: float | None) -> str:
    return "n/a" if acc is None else f"{acc:.3f}"


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    from zoft.errors import Interrupted
    from zoft.train.loop import train  # imports torch: after --help has had its chance

    try:
        result = train(build_config(a))
    except Interrupted as e:  # Ctrl-C: a checkpoint was saved, --resume continues
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.code)
    except ZoftError as e:
        msg = str(e)
        hint = f"; {OFFLINE_HINT}" if "hub" in msg and "rotten_tomatoes" not in msg else ""
        print(f"error: {msg}{hint}", file=sys.stderr)
        sys.exit(2)
    print(f"MeZO-LoRA on {a.model}, task {a.task}: {result['steps']} steps in {result['seconds']:.1f} s "
          f"({result['seconds_per_step']:.3f} s/step, {result['work_saved']:.0%} of forward work saved)")
    print(f"  test accuracy: zero-shot {fmt(result['zero_shot_accuracy'])} -> "
          f"after MeZO {fmt(result.get('final_accuracy'))}")
    print(f"  adapter (loads with peft.PeftModel.from_pretrained): {a.output_dir}/adapter")
    print(json.dumps({"model": a.model, "task": a.task} | result))


if __name__ == "__main__":
    main()
