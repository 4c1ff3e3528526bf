"""`zoft train | eval | export | demo`: the command line, generated from the config dataclasses.

Errors the user can fix (zoft.errors.ZoftError) print one line and exit with status 2; nothing else
is caught, so a real bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from zoft import __version__
from zoft.config import (
    ModelConfig,
    RunConfig,
    TaskConfig,
    TrainConfig,
    ZOConfig,
    add_arguments,
    from_namespace,
    read_config_file,
)
from zoft.errors import Interrupted, ZoftError
from zoft.files import check_output_dir, check_output_file, describe_os_error, os_error_of, read_json

DEMO = dict(  # the embedded default: real SmolLM2 weights, real Rotten Tomatoes data, ~5 min on 2 CPU cores
    mode="lora", layers="top4", lr=5e-3, eps=1e-2, batch_size=16,
    n_train=1000, n_dev=200, n_test=500,
    steps=900, eval_every=300, output_dir="runs/demo",
)


def _train_config(ns) -> TrainConfig:
    return TrainConfig(from_namespace(ModelConfig, ns), from_namespace(TaskConfig, ns),
                       from_namespace(ZOConfig, ns), from_namespace(RunConfig, ns))


def cmd_train(ns) -> None:
    from zoft.train.loop import train

    result = train(_train_config(ns))
    if result:  # ranks other than 0 return nothing under torchrun
        print(json.dumps(result))


def cmd_demo(ns) -> None:
    """Train with the demo preset (the demo parser's defaults, so any flag given still overrides it)."""
    from zoft.train.loop import train

    cfg = _train_config(ns)
    if not cfg.run.resume and cfg.run.output_dir == DEMO["output_dir"]:
        cfg.run.overwrite_output_dir = True  # the demo's own folder: start fresh each time
    result = train(cfg)
    print(json.dumps({k: result.get(k) for k in ("zero_shot_accuracy", "final_accuracy", "steps", "seconds")} | result))


def run_of(adapter: str) -> str:
    """The run folder an adapter belongs to (RUN/adapter, RUN/best, RUN/checkpoint), or ""."""
    from zoft.train import rundir

    parent = os.path.dirname(os.path.normpath(adapter))
    is_run = adapter and rundir.read_run_config(parent) and os.path.isfile(os.path.join(parent, rundir.SPLITS))
    return parent if is_run else ""


def eval_setup(ns) -> tuple[TaskConfig, dict | None, str]:
    """The task, the run's recorded splits (None: draw them) and the model to evaluate.

    With a run (--run, or an --adapter inside a run folder) the model and data default to the run's and
    the splits are the ones it recorded; a data or size flag draws new ones (still never a training row)."""
    from zoft.train import rundir

    if ns.run and not rundir.read_run_config(ns.run):
        raise ZoftError(f"--run {ns.run} is not a zoft run folder (no {rundir.CONFIG}); pass a zoft train --output-dir")
    run = ns.run or run_of(ns.adapter)
    saved = rundir.read_run_config(run) if run else None
    fields = {f.name for f in dataclasses.fields(TaskConfig)}
    # unset (None) in the eval parser: a flag given on the command line, else the run's, else the default
    given = {k: v for k in fields if (v := getattr(ns, k, None)) is not None}
    task = {k: v for k, v in saved["task"].items() if k in fields} if saved else {}
    recorded = None
    if saved and not given and os.path.isfile(os.path.join(run, rundir.SPLITS)):
        recorded = read_json(os.path.join(run, rundir.SPLITS), "recorded splits", "pass the data with --task or "
                             "--test-file to draw new splits")
        if recorded.get("name") == "datasets":
            raise ZoftError(f"{run} trained on data passed in memory (the Python API), which zoft eval can't read "
                            "back; pass the same data as files with --train-file/--validation-file/--test-file")
    model = ns.model or (saved["model"]["model"] if saved else ModelConfig().model)
    return TaskConfig(**task | given), recorded, model


def cmd_eval(ns) -> None:
    from zoft.evaluate import evaluate_split, with_demonstrations, write_predictions
    from zoft.session import describe, load_session, log, make_engine
    from zoft.tasks import draw_splits, load_task, recorded_splits
    from zoft.tasks.encode import encode
    from zoft.train.data import model_chat

    if ns.output:
        check_output_file(ns.output, "--output")
    if ns.eval_batch_size < 1:
        raise ZoftError(f"--eval-batch-size must be at least 1, got {ns.eval_batch_size}")
    tc, recorded, ns.model = eval_setup(ns)
    mc = from_namespace(ModelConfig, ns)
    task = load_task(tc, model_chat(mc))  # before the model: bad data fails in a second
    if recorded is not None:  # the run's own splits, checked against their hashes
        splits = recorded_splits(task, recorded, os.path.join(ns.run or run_of(ns.adapter), "splits.json"))
    else:
        splits = draw_splits(task, ns.icl_k, tc.n_dev, tc.n_test, ns.seed).examples
    got, asked = len(splits[ns.split]), {"test": tc.n_test, "dev": tc.n_dev}[ns.split]
    if not got:  # an empty split is an error, not "accuracy 0.0"
        raise ZoftError(f"the {ns.split} split of {task.name} came out empty: nothing to evaluate "
                        f"(check --n-{ns.split} and the data, or pass --test-file / --validation-file)")
    if got < asked and recorded is None:
        log(f"zoft: warning: {task.name}: the {ns.split} split has {got} examples, fewer than --n-{ns.split} {asked}")
    s = load_session(mc)
    load_trained(s, ns)
    engine = make_engine(s)
    log(describe(s, engine))
    exs = splits[ns.split]
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
    from zoft.files import load_tensors
    from zoft.lora import load_peft_weights, read_adapter_config
    from zoft.prefix import PEFT_TYPE, check_adapter_config, load_prefix
    from zoft.session import attach

    adapter = ns.adapter
    if not adapter and ns.run:
        cfg = load_run_config(ns.run)
        src = trained_dir(ns.run)
        if cfg.zo.mode == "full":
            attach(s, cfg.zo)
            tensors = load_tensors(os.path.join(src, "trained.safetensors"), f"the run's {src} is damaged")
            for n, t in zip(s.trainable.names, s.trainable.tensors):
                t.data.copy_(tensors[n])
            return
        adapter = src
    if adapter:
        ac = read_adapter_config(adapter)
        if ac.get("peft_type") == PEFT_TYPE:
            tokens = check_adapter_config(ac, None, f"{adapter}/adapter_config.json")
            attach(s, ZOConfig(mode="prefix", prefix_tokens=tokens))
            load_prefix(s.prefix, adapter)
            return
        layers = ac.get("layers_to_transform")
        try:
            zc = ZOConfig(mode="lora", lora_r=ac["r"], lora_alpha=ac["lora_alpha"],
                          lora_targets=list(ac["target_modules"]), layers=",".join(map(str, layers)) if layers else "")
        except (KeyError, TypeError) as e:
            raise ZoftError(f"{adapter}/adapter_config.json lacks or mistypes {e}; pass a LoRA adapter folder "
                            "saved by zoft or peft") from None
        attach(s, zc)
        load_peft_weights(s.loras, adapter)


def cmd_export(ns) -> None:
    from zoft.export import export_merged

    check_output_dir(ns.output_dir)
    dtype = export_merged(ns.run_dir, ns.output_dir, merge=ns.merge, dtype=ns.dtype, overwrite=ns.overwrite_output_dir)
    print(json.dumps({"output_dir": ns.output_dir, "dtype": dtype}))


def cmd_replay(ns) -> None:
    from zoft.train.replay import replay

    check_output_dir(ns.output_dir)
    print(json.dumps(replay(ns.model, ns.log, ns.output_dir, ns.device, ns.overwrite_output_dir)))


def cmd_bench(ns) -> None:
    from zoft.bench.harness import report, run_bench

    report(run_bench(ns.model, ns.workload, ns.mode, ns.dtype, ns.device, ns.steps, ns.warmup, ns.batch_size, ns.seed,
                     reference=ns.reference == "mezo", full_step=ns.full_step, master_dtype=ns.master_dtype,
                     offload=ns.offload, layers=ns.layers))


def cmd_tasks(ns) -> None:
    from zoft.tasks import describe_tasks

    if ns.fetch_bigbench:
        from zoft.tasks.bigbench import fetch_bigbench

        print(f"zoft: BIG-bench files cached in {fetch_bigbench(archive=ns.archive)}", file=sys.stderr)
    elif ns.archive is not None:
        raise ZoftError("--archive is the bigbench-1.0.0.tar.gz that --fetch-bigbench reads; add --fetch-bigbench")
    rows = describe_tasks()
    w = max(len(r[0]) for r in rows)
    for name, kind, source, ok, note in rows:
        print(f"{name:<{w}}  {kind:<3}  {'yes' if ok else 'no ':<3}  {source}" + (f"  ({note})" if note else ""))


def cmd_plot(ns) -> None:
    from zoft.plot import plot

    if ns.window < 1:
        raise ZoftError(f"--window must be at least 1, got {ns.window}")
    check_output_file(ns.output, "--output")
    print(json.dumps({"output": plot(ns.run_dirs, ns.output, ns.window, ns.x)}))


def cmd_compare(ns) -> None:
    from zoft.compare import compare, parse_thresholds, table

    thresholds = parse_thresholds(ns.thresholds)
    split, rows = compare(ns.run_dirs, thresholds, ns.split)
    if ns.json:
        for r in rows:
            print(json.dumps(r | {"split": split}))
    else:
        print(table(split, rows, thresholds))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoft", description="Zeroth-order (MeZO) fine-tuning of causal language models.")
    p.add_argument("--version", action="version", version=f"zoft {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    for name, fn, help_ in [("train", cmd_train, "fine-tune with MeZO"),
                            ("demo", cmd_demo, "the embedded default: SmolLM2-135M on Rotten Tomatoes, offline")]:
        sp = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        sp.add_argument("--config", default="", help="a YAML or JSON file of options (flat, or in model/task/zo/run "
                        "sections as a run's config.json); flags given on the command line override it")
        for cls in (ModelConfig, TaskConfig, ZOConfig, RunConfig):
            add_arguments(sp, cls)
        sp.set_defaults(fn=fn, **(DEMO if name == "demo" else {}))

    add_eval_parser(sub)

    sp = sub.add_parser("export", help="write a merged Hugging Face model folder from a run",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sp.add_argument("run_dir")
    sp.add_argument("--output-dir", required=True, help="a new or empty folder (written aside, then renamed)")
    sp.add_argument("--merge", action="store_true", help="fold the LoRA adapter into the base weights (not for --mode prefix: a prefix "
                    "cannot be folded into weights)")
    sp.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="the merged weights' dtype; auto: the base checkpoint's own")
    sp.add_argument("--overwrite-output-dir", action="store_true", help="replace an earlier export in --output-dir")
    sp.set_defaults(fn=cmd_export)

    sp = sub.add_parser("replay", help="rebuild a run's adapter or weights from the base model and its step log",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sp.add_argument("--model", required=True, help="the base model the run started from")
    sp.add_argument("--log", required=True, help="the run's steps.jsonl")
    sp.add_argument("--output-dir", required=True, help="a new or empty folder (written aside, then renamed)")
    sp.add_argument("--device", default="", help="default: the device type the run used (z depends on it)")
    sp.add_argument("--overwrite-output-dir", action="store_true", help="replace an earlier replay in --output-dir")
    sp.set_defaults(fn=cmd_replay)

    add_bench_parser(sub)

    sp = sub.add_parser("tasks", help="list built-in tasks, their source, and whether they load offline now",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sp.add_argument("--fetch-bigbench", action="store_true",
                    help="download the bigbench 1.0.0 sdist once (358 MB) and cache SQuAD, DROP and MultiRC from it")
    sp.add_argument("--archive", metavar="PATH", default=None,
                    help="with --fetch-bigbench: read this copy of bigbench-1.0.0.tar.gz instead of downloading it "
                         "(its sha256 is checked)")
    sp.set_defaults(fn=cmd_tasks)

    sp = sub.add_parser("plot", help="loss and dev-accuracy curves of one or more runs, to a PNG",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sp.add_argument("run_dirs", nargs="+")
    sp.add_argument("--output", default="curves.png")
    sp.add_argument("--window", type=int, default=20, help="moving-average window for the loss")
    sp.add_argument("--x", default="steps", choices=["steps", "forwards", "seconds"],
                    help="the curves' x axis: optimizer steps, forward passes used, or seconds of training (without "
                    "loading, evaluations and saves)")
    sp.set_defaults(fn=cmd_plot)

    sp = sub.add_parser("compare", help="runs side by side: steps, forwards and training seconds to reach each "
                        "threshold, final score, state and memory; seeds of one setting averaged",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sp.add_argument("run_dirs", nargs="+")
    sp.add_argument("--thresholds", default="0.80,0.84", help="scores to reach, separated by commas")
    sp.add_argument("--split", default="auto", choices=["auto", "dev", "test"],
                    help="the curve the thresholds are read on; auto: test when every run has one (--eval-test)")
    sp.add_argument("--json", action="store_true", help="one JSON line per arm instead of the Markdown table")
    sp.set_defaults(fn=cmd_compare)
    return p


def apply_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`train|demo --config FILE`: the file's values become the subcommand's defaults, so flags override them."""
    if not argv or argv[0] not in ("train", "demo"):
        return
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default="")
    path = pre.parse_known_args(argv[1:])[0].config
    if path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[argv[0]]
        sub.set_defaults(**read_config_file(path))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser, ns = build_parser(), None
    try:
        apply_config_file(parser, argv)
        ns = parser.parse_args(argv)
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
    except Exception as e:  # disk full, a read-only folder: the environment, not a bug; anything else propagates
        oe = os_error_of(e)
        if oe is None:
            raise
        hint = _resume_hint(ns.output_dir) if getattr(ns, "command", "") in ("train", "demo") else ""
        print(f"zoft: error: {describe_os_error(oe)}{hint}", file=sys.stderr)
        sys.exit(2)


def _resume_hint(out: str) -> str:
    """After a failed write mid-run: which checkpoint survived it, and how to go on from there."""
    for name in ("checkpoint", "checkpoint.old"):  # .old: the failure hit between a save's two renames
        state = os.path.join(out, name, "state.json")
        try:
            with open(state) as f:
                step = json.load(f)["next_step"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return (f"; the run stopped, its last checkpoint (step {step}) and step log in {out} are intact: "
                "continue with the same command plus --resume")
    return ""


if __name__ == "__main__":
    main()


def add_eval_parser(sub) -> None:
    """`zoft eval`: task flags unset come from the run (--run, or an adapter inside a run folder)."""
    sp = sub.add_parser("eval", help="accuracy by candidate log-likelihood (F1 and exact match for generation)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(sp, ModelConfig)
    add_arguments(sp, TaskConfig, skip=("n_train", "k_shot", "loss"))
    # unset, these come from the run (--run, or an --adapter inside a run folder), else the defaults
    sp.set_defaults(model=None, **{f.name: None for f in dataclasses.fields(TaskConfig)})
    sp.add_argument("--run", default="", help="a zoft run folder: evaluate its trained parameters on the splits it "
                    "recorded (its test split unless --split dev), with its model and task")
    sp.add_argument("--adapter", default="", help="a PEFT/zoft LoRA or prefix-tuning adapter folder to apply (RUN/adapter: the run's "
                    "recorded splits, as with --run)")
    sp.add_argument("--split", default="test", choices=["test", "dev"])
    sp.add_argument("--icl-k", type=int, default=0,
                    help="in-context learning baseline: prepend k solved training examples to every prompt")
    sp.add_argument("--output", default="", help="write one JSON row per example here")
    sp.add_argument("--eval-batch-size", type=int, default=32)
    sp.add_argument("--seed", type=int, default=0, help="draws the dev split (and the --icl-k examples)")
    sp.set_defaults(fn=cmd_eval)


def add_bench_parser(sub) -> None:
    """`zoft bench` (zoft.bench.harness)."""
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
    sp.add_argument("--reference", default="mezo", choices=["mezo", "none"],
                    help="none: time zoft alone, on random weights built on the device (shapes whose "
                         "transformers copy would not fit the disk or the GPU beside zoft's, e.g. opt-30b)")
    sp.add_argument("--full-step", default="auto", choices=["auto", "rows", "inplace"], help="as zoft train's")
    sp.add_argument("--master-dtype", default="auto", choices=["auto", "float32"], help="as zoft train's")
    sp.add_argument("--offload", default="none", choices=["none", "cpu"], help="as zoft train's")
    sp.add_argument("--layers", default="", help="as zoft train's (blocks trained; empty: all parameters)")
    sp.set_defaults(fn=cmd_bench)
