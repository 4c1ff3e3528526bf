"""From a config to a ready model: load, pick the native or fallback path, attach LoRA, build the engine."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass

import torch
from torch import nn

from zoft.config import ModelConfig, ZOConfig, parse_layers
from zoft.engine.native import NativeEngine
from zoft.engine.offload import offload_to_host, stream_blocks
from zoft.errors import ZoftError
from zoft.loading import (
    ALIASES,
    DTYPES,
    PRESET_HUB,
    build_native,
    load_tokenizer,
    native_class,
    read_config,
    resolve,
    resolve_alias,
)
from zoft.logs import log
from zoft.lora import LoraArgs, LoRALinear, flatten_lora_, inject_lora, linear_like, resolve_targets
from zoft.models import hf
from zoft.prefix import Prefix, attach_native, hf_kv, native_kv, prefix_shape, random_tokens
from zoft.zo.methods import make_method
from zoft.zo.noise import HALF
from zoft.zo.perturbers import FullRowsPerturber, InPlacePerturber, LoRAPerturber, PrefixPerturber
from zoft.zo.trainable import Trainable, full_trainable, lora_trainable, prefix_trainable


def peft_base(source: str, folder: str) -> str:
    """The adapter's base_model_name_or_path: what AutoPeftModelForCausalLM resolves from anywhere. A hub id
    stays as given; a local folder, a GGUF file or the packaged alias becomes the absolute path of the
    Hugging Face folder zoft loaded (for GGUF, its converted cache folder)."""
    if source in ALIASES or source.endswith(".gguf") or os.path.exists(source):
        return os.path.abspath(folder)
    return PRESET_HUB.get(source, source)


def pick_device(spec: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", spec):
        raise ZoftError(f"--device {spec!r}: expected auto, cpu, cuda or cuda:N")
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ZoftError(f"--device {spec}: no CUDA device is available here; use --device cpu")
    return spec


@dataclass
class Session:
    model: nn.Module
    tokenizer: object
    folder: str
    source: str  # what the user passed
    path: str  # "native opt" | "native llama" | "transformers fallback (gpt_neox)"
    device: str
    max_length: int
    n_layers: int
    block_prefix: str
    short_targets: dict
    loras: dict[str, LoRALinear] | None = None
    trainable: Trainable | None = None
    target_names: list[str] | None = None
    layers: list[int] | None = None
    lora_args: LoraArgs | None = None
    prefix: Prefix | None = None  # --mode prefix: the trained key/value prefixes (zoft.prefix)
    offload: str = "none"
    attention: str = "auto"  # --attention: auto | varlen | mask
    full_step: str = "inplace"  # full mode: "inplace" passes or "rows" of one forward (zoft.zo.perturbers)
    perturber: object = None  # how a step evaluates L(θ ± εz) (zoft.zo.perturbers), chosen once at attach
    method: object = None  # --optimizer's estimator and update rule (zoft.zo.methods); None: ZO-SGD
    load_dtype: torch.dtype = torch.float32  # --dtype: what the checkpoint's tensors were rounded to on load

    @property
    def native(self) -> bool:
        return self.path.startswith("native")


def load_session(mc: ModelConfig, random_weights: bool = False) -> Session:
    source = resolve_alias(mc.model)
    folder = resolve(source)
    cfg = read_config(folder)
    device = pick_device(mc.device)
    dtype = DTYPES[mc.dtype]
    use_native = mc.engine == "native" or (mc.engine == "auto" and native_class(cfg) is not None)
    if mc.engine == "native" and native_class(cfg) is None:
        raise ZoftError(f"no native implementation for model_type {cfg.get('model_type')!r}; use --engine hf or auto")
    if mc.offload == "cpu" and not use_native:
        raise ZoftError("--offload cpu needs a native model (OPT, Llama family); this one runs on the hf fallback")
    if use_native:
        build_on = "cpu" if mc.offload == "cpu" else device
        model = build_native(folder, cfg, dtype, build_on, weights=not random_weights).eval()
        if mc.offload == "cpu":  # blocks and vocabulary tables stay in CPU memory; the rest goes to the device
            offload_to_host(model, device)
        for p in model.parameters():
            p.requires_grad_(False)
        path, prefix, short = f"native {model.family}", model.block_prefix, model.lora_targets
        n_layers, max_len = len(model.blocks), model.max_positions
    else:
        model = hf.load_hf(folder, dtype, device)
        path, prefix = f"transformers fallback ({cfg.get('model_type')})", hf.block_prefix(model)
        linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if linear_like(m)}
        short = {k: v for k, v in hf.LORA_TARGETS.get(cfg.get("model_type"), hf.DEFAULT_TARGETS).items()
                 if v in linear}  # only names this model has: an error never offers a choice it refuses
        n_layers = len(model.get_submodule(prefix))
        max_len = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
    tok = load_tokenizer(folder)
    max_len = min(mc.max_length, max_len) if mc.max_length else max_len
    return Session(model, tok, folder, mc.model, path, device, max_len, n_layers, prefix, short,
                   offload=mc.offload, attention=mc.attention, load_dtype=dtype)


def check_lora_targets(s: Session, zc: ZOConfig) -> None:
    """LoRA goes on linear layers (nn.Linear, or GPT-2's Conv1D): a target naming anything else is refused
    here, with the modules that can take it, before attach() fails less clearly."""
    if zc.mode != "lora":
        return
    linear = {n.rsplit(".", 1)[-1] for n, m in s.model.named_modules() if linear_like(m)}
    wanted = [s.short_targets.get(t, t) for t in zc.lora_targets]
    if any(t not in linear for t in wanted):
        short = sorted(k for k, v in s.short_targets.items() if v in linear)
        raise ZoftError(f"--lora-targets {' '.join(zc.lora_targets)}: no linear layer of this model has that name; "
                        f"LoRA can go on {', '.join(short + sorted(linear)) or 'none'}, or train with --mode full")


def attach(s: Session, zc: ZOConfig, seed: int = 0) -> None:
    """Make the chosen parameters trainable: LoRA modules, or (a float32 copy of) the full blocks."""
    s.layers = parse_layers(zc.layers, s.n_layers)
    if zc.mode == "lora":
        s.lora_args = LoraArgs(zc.lora_r, zc.lora_alpha, list(zc.lora_targets), zc.lora_freeze_a)
        s.target_names = resolve_targets(s.model, s.lora_args.targets, s.short_targets)
        s.loras = inject_lora(s.model, s.block_prefix, s.target_names, s.layers, s.lora_args, seed)
        for m in s.loras.values():  # trained parameters live on the device, even when blocks are streamed
            m.lora_A.data, m.lora_B.data = m.lora_A.data.to(s.device), m.lora_B.data.to(s.device)
        flatten_lora_(s.loras)  # one flat tensor: θ, snapshots and updates in one op each
        s.trainable = lora_trainable(s.loras)
        s.perturber = LoRAPerturber(s.loras, s.trainable)
        s.method = make_method(zc, s.trainable, seed)
    elif zc.mode == "prefix":
        _attach_prefix(s, zc, seed)
    else:
        _attach_full(s, zc)


def _attach_prefix(s: Session, zc: ZOConfig, seed: int) -> None:
    """Prefix mode: a prefix for every layer, initialised from the keys and values of random vocabulary
    tokens (zoft.prefix), given to the native model's attention modules (the fallback's engine reads it)."""
    if s.layers is not None:
        raise ZoftError(f"--layers {zc.layers} with --mode prefix: peft's prefix-tuning format holds a prefix for every "
                        "layer, so zoft trains them all; drop --layers (or use --mode lora)")
    if s.offload == "cpu":
        raise ZoftError("--offload cpu with --mode prefix is not supported; drop --offload or use --mode lora")
    if s.attention == "varlen":
        raise ZoftError("--attention varlen with --mode prefix: prefix rows run attention with masks (varlen plans "
                        "have no prefix keys); use --attention auto or mask")
    cfg = read_config(s.folder)
    shape = prefix_shape(cfg, zc.prefix_tokens)
    limit = getattr(s.model, "max_positions", None) or cfg.get("max_position_embeddings") or 2048
    if limit - shape.tokens < 2:
        raise ZoftError(f"--prefix-tokens {shape.tokens} leaves no positions of this model's {limit} for the text; "
                        "use fewer (MeZO uses 5)")
    base = next(p.dtype for p in s.model.parameters())
    prefix = Prefix(shape, s.device, torch.float64 if base == torch.float64 else torch.float32)
    ids = random_tokens(cfg.get("vocab_size") or s.model.get_input_embeddings().weight.shape[0], shape.tokens, seed)
    prefix.fill(native_kv(s.model, ids) if s.native else hf_kv(s.model, ids))  # before the prefix is attached
    if s.native:
        attach_native(s.model, prefix)
    s.max_length = min(s.max_length, limit - shape.tokens)  # the text's positions start after the prefix
    s.prefix, s.trainable = prefix, prefix_trainable(prefix)
    s.perturber = PrefixPerturber(s.trainable)
    s.method = make_method(zc, s.trainable, seed)


def _attach_full(s: Session, zc: ZOConfig) -> None:
    """Full mode: the chosen blocks' (or every) parameters, in --dtype or --master-dtype, and the
    perturber that evaluates them (rows on native models, in place on the fallback)."""
    prefixes = None if s.layers is None else [f"{s.block_prefix}.{i}" for i in s.layers]
    if prefixes is None and s.offload == "cpu":
        raise ZoftError("--offload cpu with --mode full needs --layers (all of them if you like, e.g. --layers 0-23): "
                        "the trained blocks are streamed with the frozen ones, the embeddings and head stay frozen")
    step = zc.full_step if zc.full_step != "auto" else ("rows" if s.native else "inplace")
    if step == "rows" and not s.native:
        raise ZoftError("--full-step rows needs a native model (OPT, Llama family); this one runs on the "
                        "transformers fallback: use --full-step inplace (or auto)")
    owners = [s.model] if prefixes is None else [s.model.get_submodule(p) for p in prefixes]
    master = _master_dtype(s, zc, step, {p.dtype for o in owners for p in o.parameters()})
    for o in owners:  # --offload cpu: the trained blocks stay in host memory and are streamed (zoft.engine.offload)
        if master is not None:
            o.to(master)
        if s.offload != "cpu":
            o.to(s.device)
    s.trainable = full_trainable(s.model, prefixes)
    s.model.streamer = None  # a streamer made before the trained blocks changed would stream stale copies
    if s.offload == "cpu":  # the update is written through to the streamed blocks' host copies
        s.trainable.streamer = stream_blocks(s.model, s.device)
    wide = any(t.dtype == torch.float64 for t in s.trainable.tensors)
    s.trainable.z_backend = resolve_z_backend(zc.z_backend, s.device, wide)
    s.full_step = step
    s.perturber = FullRowsPerturber(s.model, s.trainable, s.device) if step == "rows" else InPlacePerturber(s.trainable)


def _master_dtype(s: Session, zc: ZOConfig, step: str, loaded: set[torch.dtype]) -> torch.dtype | None:
    """The dtype full mode converts the trained blocks to (None: train them as loaded), checked against the
    step and the device before anything moves."""
    name, half = zc.master_dtype, bool(loaded & set(HALF))
    if name == "auto":
        if not (half and step == "inplace"):
            return None
        log("zoft: full mode in place keeps a float32 master (three in-place passes would round half-precision "
            "weights each step, far more than the update); use a native model for --full-step rows in "
            f"{next(iter(loaded & set(HALF)))}")
        name = "float32"
    dtype = MASTER_DTYPES[name]
    if dtype in HALF and step == "inplace":
        raise ZoftError(f"--master-dtype {name} with --full-step inplace: the +εz, −2εz, +εz passes would round "
                        f"{name} weights each step, far more than the update; use --full-step rows (native models) "
                        "or --master-dtype float32")
    if why := dtype_fails(s.device, dtype):
        raise ZoftError(f"--master-dtype {name}: {s.device} cannot train in {name} ({why}); use --master-dtype "
                        "auto or float32")
    return dtype


MASTER_DTYPES = DTYPES | {"float64": torch.float64}  # --master-dtype's names


def dtype_fails(device: str, dtype: torch.dtype) -> str | None:
    """Why `device` cannot do in `dtype` what full mode does with its trained weights (None: it can): hold
    them, run a GEMM with them (the forward), and add a float32 z to a copy (the perturbation and the
    update). Tried on the device itself; CUDA's bfloat16 must also be native (torch.cuda.is_bf16_supported:
    on GPUs before Ampere torch emulates it, far slower than float32)."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cuda" and \
            not torch.cuda.is_bf16_supported(including_emulation=False):
        return "no native bfloat16 on this GPU"
    try:
        w = torch.ones(4, 4, dtype=dtype, device=device)
        x = torch.full((2, 4), 0.5, dtype=dtype, device=device)
        y = torch.nn.functional.layer_norm(x @ w.t() + x, (4,), w[0], w[1])  # a GEMM, a residual add, a norm: 1s
        p = (w.to(torch.float32) + torch.ones(4, 4, device=device)).to(dtype)  # a perturbed copy: 2s
        if not (torch.equal(y.float().cpu(), torch.ones(2, 4)) and torch.equal(p.float().cpu(), torch.full((4, 4), 2.0))):
            return "wrong results"
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return str(e).split("\n")[0]
    return None


def resolve_z_backend(choice: str, device, wide: bool = False) -> str:
    """auto → triton on CUDA when triton is installed, else torch; an impossible explicit choice is an error.
    wide: float64 weights (a float64 master), which only the torch backend updates."""
    cuda = str(device).startswith("cuda")
    has_triton = importlib.util.find_spec("triton") is not None
    if choice == "triton":
        if not cuda:
            raise ZoftError(f"--z-backend triton needs a CUDA device, this run uses {device}; use --z-backend torch")
        if wide:
            raise ZoftError("--z-backend triton updates float32, bfloat16 and float16 weights; with --master-dtype "
                            "float64 use --z-backend torch (or auto)")
        if not has_triton:
            raise ZoftError("--z-backend triton needs the triton package (pip install triton), or use --z-backend torch")
        return "triton"
    if choice == "torch":
        return "torch"
    return "triton" if cuda and has_triton and not wide else "torch"


def first_trained_block(s: Session) -> int:
    if s.layers is None:
        return 0
    return min(s.layers)


def make_engine(s: Session, cache_mb: float = 0.0, pack_tokens: int = 1024, cuda_graphs: bool = True,
                varlen: bool | None = None, fuse: bool | None = None):
    """varlen=None: as --attention says (auto: flash's variable-length attention where it runs, CUDA with
    half-precision blocks, else masks). fuse=None: frozen layers that share an input run as one GEMM
    (q/k/v, gate/up; NativeModel.fuse_frozen) on CUDA, unless blocks are trained in full or streamed."""
    if varlen is None and s.attention != "auto":
        varlen = s.attention == "varlen"
    if s.prefix is not None:  # prefix keys go in front of each row's keys: the mask path (zoft.models.common)
        if varlen:
            raise ZoftError("--attention varlen with --mode prefix: use --attention auto or mask")
        varlen = False
    if fuse is None:
        fuse = (str(s.device).startswith("cuda") and s.offload != "cpu"
                and (s.loras is not None or s.prefix is not None or s.trainable is None))
    if s.native:
        # the blocks' streamer is made here, after attach, so it streams the trained blocks' final tensors
        streamer = stream_blocks(s.model, s.device) if s.offload == "cpu" else None
        return NativeEngine(s.model, first_trained_block(s), cache_mb, pack_tokens, streamer, cuda_graphs,
                            varlen, fuse)
    if varlen:
        raise ZoftError(f"--attention varlen needs a native model (OPT, Llama family); {s.path} packs nothing")
    from zoft.engine.hf import HFEngine

    return HFEngine(s.model, s.prefix)


def describe(s: Session, engine, zo: bool = True) -> str:
    feats = []
    if s.native:
        layout = "packed sequences in one row" if engine.varlen else "packed rows (block-diagonal SDPA mask)"
        feats += [layout, "prompt shared across candidates", "logits at read positions"]
        if engine.streamer is not None:
            feats.append(f"blocks streamed from CPU memory ({engine.streamer.bytes_per_pass / 2**30:.2f} GiB a pass), "
                         "vocabulary tables kept there")
        if engine.first_trained > 0:
            feats.append(f"frozen blocks 0-{engine.first_trained - 1} run once per batch")
            if engine.cache is not None:
                feats.append(f"prefix cache {engine.cache.budget / 2**20:.0f} MB")
        if engine.varlen and engine.device.type == "cuda":
            feats.append("attention: flash variable-length kernel (no mask, no work across examples)")
        elif engine.varlen:
            feats.append("attention: varlen sequences through zoft's plain-torch reference (slow; for checking)")
        elif str(s.device).startswith("cuda"):
            feats.append("attention: SDPA memory-efficient/flash kernels with the bool mask (cuDNN off)")
        else:
            feats.append("attention: SDPA on the CPU with the bool mask")
        if engine.fused:
            feats.append(f"{engine.fused} groups of frozen layers fused into one GEMM each (q/k/v, gate/up)")
        if engine.graphs is not None:
            feats.append("CUDA graph per training batch shape")
    if s.loras and zo and s.method is not None:
        feats.append(f"LoRA rows of {s.method.name} in one forward ({len(s.loras)} modules)")
    elif s.loras and zo:
        feats.append(f"LoRA ±ε rows in one forward ({len(s.loras)} modules)")
    elif s.prefix is not None and zo:
        sh = s.prefix.shape
        rows = f"the rows of {s.method.name}" if s.method is not None else "±ε prefixes as rows"
        feats.append(f"prefix tuning: {sh.tokens} virtual tokens × {sh.layers} layers, {rows} of one forward")
    elif s.trainable is not None and zo:
        how = "±ε as rows of one forward, θ never modified" if s.full_step == "rows" else "perturbed in place"
        dt = str(s.trainable.tensors[0].dtype).removeprefix("torch.")
        sr = ", stochastically rounded updates" if s.trainable.tensors[0].dtype in HALF else ""
        feats.append(f"full parameters ({dt}{sr}) {how}, z from {s.trainable.z_backend}")
    return f"zoft: {s.path} path on {s.device}; " + "; ".join(feats)




def progress(**kw):
    """A tqdm bar for a long loop. When stderr is not a terminal (a log file, a job scheduler), it
    refreshes every 30 s instead of every 0.1 s: a 20k-step run's log stays readable, not megabytes."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        kw.setdefault("mininterval", 30.0)
    return tqdm(**kw)
