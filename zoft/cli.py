"""`zoft train | eval | export | demo`: the command line, generated from the config dataclasses.

Errors the user can fix (zoft.errors.ZoftError) print one line and exit with status 2; nothing else
is caught, so a real bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from zoft.config import (
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    ZOConfig,
    add_arguments,
    from_namespace,
)
from zoft.errors import Interrupted, ZoftError

DEMO = dict(  # the embedded default: real SmolLM2 weights, real Rotten Tomatoes data, ~5 min on 2 CPU cores
    zo=dict(mode="lora", layers="top4", lr=5e-3, eps=1e-2, batch_size=16),
    task=dict(n_train=1000, n_dev=200, n_test=500),
    run=dict(steps=900, eval_every=300, output_dir="runs/demo"),
)


def _train_config(ns) -> TrainConfig:
    return TrainConfig(from_namespace(ModelConfig, ns), from_namespace(TaskConfig, ns),
                       from_namespace(ZOConfig, ns), from_namespace(RunConfig, ns))


def cmd_train(ns) -> None:
    from zoft.train import train

    result = train(_train_config(ns))
    if result:  # ranks other than 0 return nothing under torchrun
        print(json.dumps(result))


def cmd_demo(ns) -> None:
    """Train with the demo preset; any flag given on the command line still overrides it."""
    from zoft.train import train

    cfg = _train_config(ns)
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in sys.argv if a.startswith("--")}
    for section, values in DEMO.items():
        for k, v in values.items():
            if k not in given:
                setattr(getattr(cfg, section), k, v)
    if "output_dir" not in given and not cfg.run.resume:
        cfg.run.overwrite_output_dir = True  # the demo's own folder: start fresh each time
    result = train(cfg)
    print(json.dumps({k: result.get(k) for k in ("zero_shot_accuracy", "final_accuracy", "steps", "seconds")} | result))


def run_of(adapter: str) -> str:
    """The run folder an adapter belongs to (RUN/adapter, RUN/best, RUN/checkpoint), or ""."""
    from zoft import rundir

    parent = os.path.dirname(os.path.normpath(adapter))
    is_run = adapter and rundir.read_run_config(parent) and os.path.isfile(os.path.join(parent, rundir.SPLITS))
    return parent if is_run else ""


def eval_setup(ns) -> tuple[TaskConfig, dict | None, str]:
    """The task, the run's recorded splits (None: draw them) and the model to evaluate.

    With a run (--run, or an --adapter inside a run folder) the model and task default to the run's and
    the splits are the ones it recorded; a task or size flag draws new ones (still never a training row)."""
    from zoft import rundir

    if ns.run and not rundir.read_run_config(ns.run):
        raise ZoftError(f"--run {ns.run} is not a zoft run folder (no {rundir.CONFIG}); pass a zoft train --output-dir")
    run = ns.run or run_of(ns.adapter)
    saved = rundir.read_run_config(run) if run else None
    given = {k: getattr(ns, k) for k in ("task", "data_dir", "template", "n_dev", "n_test") if getattr(ns, k) is not None}
    task = {k: saved["task"][k] for k in ("task", "data_dir", "template")} if saved else {}
    recorded = None
    if saved and not given and os.path.isfile(os.path.join(run, rundir.SPLITS)):
        with open(os.path.join(run, rundir.SPLITS)) as f:
            recorded = json.load(f)
    model = ns.model or (saved["model"]["model"] if saved else ModelConfig().model)
    return TaskConfig(**task | given), recorded, model


def cmd_eval(ns) -> None:
    from zoft.evaluate import evaluate_split, with_demonstrations, write_predictions
    from zoft.session import describe, load_session, log, make_engine
    from zoft.tasks import draw_splits, get_task, recorded_splits
    from zoft.tasks.encode import encode

    tc, recorded, ns.model = eval_setup(ns)
    task = get_task(tc.task, data_dir=tc.data_dir or None, template=tc.template or None)
    if recorded is not None:  # before the model loads: changed data fails in a second
        splits = recorded_splits(task, recorded, os.path.join(ns.run or run_of(ns.adapter), "splits.json"))
    else:
        splits = draw_splits(task, ns.icl_k, tc.n_dev, tc.n_test, ns.seed).examples
    exs = splits[ns.split]
    if not exs:
        raise ZoftError(f"the {ns.split} split of {tc.task} is empty (--n-{ns.split} "
                        f"{tc.n_test if ns.split == 'test' else tc.n_dev}); ask for examples or check the data")
    s = load_session(from_namespace(ModelConfig, ns))
    load_trained(s, ns)
    engine = make_engine(s)
    log(describe(s, engine))
    exs = with_demonstrations(exs, splits["train"][: ns.icl_k]) if ns.icl_k else exs
    enc, n_trunc = encode(s.tokenizer, exs, s.max_length, ns.truncation)
    if n_trunc:
        log(f"zoft: {n_trunc} of {len(exs)} prompts truncated from the left to {s.max_length} tokens")
    ev = evaluate_split(engine, s, enc, exs, ns.eval_batch_size, desc="eval")
    if ns.output:
        write_predictions(ns.output, ev["rows"], exs)
    extra = {"exact_match": ev["em"]} if ev["metric"] == "f1" else {}  # generation: exact match beside F1
    print(json.dumps({ev["metric"]: ev["score"], **extra, "n": ev["n"], "task": tc.task, "split": ns.split,
                      "splits": "the run's" if recorded is not None else "drawn", "icl_k": ns.icl_k, "path": s.path}))


def load_trained(s, ns) -> None:
    """Apply what is evaluated: --adapter, or the trained parameters of --run (its adapter, else best/ or
    checkpoint/ of a full-parameter run)."""
    from zoft.export import load_run_config, trained_dir
    from zoft.lora import load_peft_weights, read_adapter_config
    from zoft.session import attach

    adapter = ns.adapter
    if not adapter and ns.run:
        cfg = load_run_config(ns.run)
        src = trained_dir(ns.run)
        if cfg.zo.mode == "full":
            from safetensors.torch import load_file

            attach(s, cfg.zo)
            tensors = load_file(os.path.join(src, "trained.safetensors"))
            for n, t in zip(s.trainable.names, s.trainable.tensors):
                t.data.copy_(tensors[n])
            return
        adapter = src
    if adapter:
        ac = read_adapter_config(adapter)
        layers = ac.get("layers_to_transform")
        zc = ZOConfig(mode="lora", lora_r=ac["r"], lora_alpha=ac["lora_alpha"], lora_targets=list(ac["target_modules"]),
                      layers=",".join(map(str, layers)) if layers else "")
        attach(s, zc)
        load_peft_weights(s.loras, adapter)


def cmd_export(ns) -> None:
    from zoft.export import export_merged

    export_merged(ns.run_dir, ns.output_dir, merge=ns.merge, overwrite=ns.overwrite_output_dir)
    print(json.dumps({"output_dir": ns.output_dir}))


def cmd_replay(ns) -> None:
    from zoft.train import replay

    print(json.dumps(replay(ns.model, ns.log, ns.output_dir, ns.device, ns.overwrite_output_dir)))


def cmd_bench(ns) -> None:
    from zoft.bench import report, run_bench

    report(run_bench(ns.model, ns.workload, ns.mode, ns.dtype, ns.device, ns.steps, ns.warmup, ns.batch_size, ns.seed))


def cmd_tasks(ns) -> None:
    from zoft.tasks import describe_tasks

    if ns.fetch_bigbench:
        from zoft.tasks.bigbench import fetch_bigbench

        print(f"zoft: BIG-bench files cached in {fetch_bigbench()}", file=sys.stderr)
    rows = describe_tasks()
    w = max(len(r[0]) for r in rows)
    for name, kind, source, ok, note in rows:
        print(f"{name:<{w}}  {kind:<3}  {'yes' if ok else 'no ':<3}  {source}" + (f"  ({note})" if note else ""))


def cmd_plot(ns) -> None:
    from zoft.plot import plot

    print(json.dumps({"output": plot(ns.run_dirs, ns.output, ns.window)}))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoft", description="Zeroth-order (MeZO) fine-tuning of causal language models.")
    sub = p.add_subparsers(dest="command", required=True)

    for name, fn, help_ in [("train", cmd_train, "fine-tune with MeZO"),
                            ("demo", cmd_demo, "the embedded default: SmolLM2-135M on Rotten Tomatoes, offline")]:
        sp = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for cls in (ModelConfig, TaskConfig, ZOConfig, RunConfig):
            add_arguments(sp, cls)
        sp.set_defaults(fn=fn)

    sp = sub.add_parser("eval", help="accuracy by candidate log-likelihood (F1 and exact match for generation)")
    add_arguments(sp, ModelConfig)
    add_arguments(sp, TaskConfig, skip=("n_train", "k_shot", "loss"))
    # unset, these come from the run (--run, or an --adapter inside a run folder), else the defaults
    sp.set_defaults(model=None, task=None, data_dir=None, template=None, n_dev=None, n_test=None)
    sp.add_argument("--run", default="", help="a zoft run folder: evaluate its trained parameters on the splits it "
                    "recorded (its test split unless --split dev), with its model and task")
    sp.add_argument("--adapter", default="", help="a PEFT/zoft LoRA adapter folder to apply (RUN/adapter: the run's "
                    "recorded splits, as with --run)")
    sp.add_argument("--split", default="test", choices=["test", "dev"])
    sp.add_argument("--icl-k", type=int, default=0,
                    help="in-context learning baseline: prepend k solved training examples to every prompt")
    sp.add_argument("--output", default="", help="write one JSON row per example here")
    sp.add_argument("--eval-batch-size", type=int, default=32)
    sp.add_argument("--seed", type=int, default=0, help="draws the dev split (and the --icl-k examples)")
    sp.set_defaults(fn=cmd_eval)

    sp = sub.add_parser("export", help="write a merged Hugging Face model folder from a run")
    sp.add_argument("run_dir")
    sp.add_argument("--output-dir", required=True, help="a new or empty folder (written aside, then renamed)")
    sp.add_argument("--merge", action="store_true", help="fold the LoRA adapter into the base weights")
    sp.add_argument("--overwrite-output-dir", action="store_true", help="replace an earlier export in --output-dir")
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("replay", help="rebuild a run's adapter or weights from the base model and its step log")
    sp.add_argument("--model", required=True, help="the base model the run started from")
    sp.add_argument("--log", required=True, help="the run's steps.jsonl")
    sp.add_argument("--output-dir", required=True, help="a new or empty folder (written aside, then renamed)")
    sp.add_argument("--device", default="", help="default: the device type the run used (z depends on it)")
    sp.add_argument("--overwrite-output-dir", action="store_true", help="replace an earlier replay in --output-dir")
    sp.set_defaults(fn=cmd_replay)

    sp = sub.add_parser("bench", help="time zoft's step against the MeZO reference step and a plain forward",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sp.add_argument("--model", default="opt-125m",
                    help="a preset with random weights (opt-125m, opt-1.3b, smollm2-135m, …) or a model folder")
    sp.add_argument("--workload", default="sst2", choices=["sst2", "multirc"], help="synthetic batch lengths")
    sp.add_argument("--mode", default="lora", choices=["lora", "full"])
    sp.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sp.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto")
    sp.add_argument("--steps", type=int, default=10, help="timed steps (the median is reported)")
    sp.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_bench)

    sp = sub.add_parser("tasks", help="list built-in tasks, their source, and whether they load offline now")
    sp.add_argument("--fetch-bigbench", action="store_true",
                    help="download the bigbench 1.0.0 sdist once (358 MB) and cache SQuAD, DROP and MultiRC from it")
    sp.set_defaults(fn=cmd_tasks)

    sp = sub.add_parser("plot", help="loss and dev-accuracy curves of one or more runs, to a PNG")
    sp.add_argument("run_dirs", nargs="+")
    sp.add_argument("--output", default="curves.png")
    sp.add_argument("--window", type=int, default=20, help="moving-average window for the loss")
    sp.set_defaults(fn=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> None:
    ns = build_parser().parse_args(argv)
    try:
        ns.fn(ns)
    except Interrupted as e:
        print(f"zoft: {e}", file=sys.stderr)
        sys.exit(e.code)
    except ZoftError as e:
        print(f"zoft: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("zoft: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
