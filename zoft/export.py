"""`zoft export RUN_DIR --merge --output-dir DIR`: a Hugging Face model folder with the training folded in.

The folder is built beside DIR and renamed into place once complete, so a killed export leaves no
half-written model that loads. DIR must be new or empty, or an earlier export (--overwrite-output-dir).
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from zoft.config import TrainConfig
from zoft.errors import ZoftError
from zoft.files import load_tensors, read_json
from zoft.lora import load_peft_weights, merge_lora
from zoft.session import attach, load_session, resolve_alias
from zoft.train import rundir

MARKER = "zoft_export.json"  # what the export came from; marks the folder as zoft's to replace


def load_run_config(run_dir: str) -> TrainConfig:
    d = rundir.read_run_config(run_dir)
    if d is None:
        path = os.path.join(run_dir, rundir.CONFIG)
        if os.path.isfile(path):  # there, but damaged: say so rather than "not a run"
            read_json(path, "run config", "pass the --output-dir of a zoft train run")
        raise ZoftError(f"{run_dir} is not a zoft run folder (no {rundir.CONFIG}); pass the --output-dir of a zoft "
                        "train run")
    base = d.pop("resolved", {}).get("base")
    cfg = TrainConfig.from_dict(d)
    if base and not os.path.exists(resolve_alias(cfg.model.model)) and os.path.isdir(base):
        cfg.model.model = base  # a relative --model, run from another folder: the absolute path it resolved to
    return cfg


def trained_dir(run_dir: str) -> str:
    for name in ("adapter", "best", "checkpoint"):
        d = os.path.join(run_dir, name)
        if os.path.isdir(d):
            return d
    raise ZoftError(f"{run_dir} holds no adapter, best or checkpoint folder; did the run save anything?")


def base_dtype(folder: str, fallback: str) -> str:
    """The dtype the base checkpoint was saved in (config.json's dtype / torch_dtype), else `fallback`."""
    from zoft.loading import DTYPES, read_config

    cfg = read_config(folder)
    d = str(cfg.get("dtype") or cfg.get("torch_dtype") or "").removeprefix("torch.")
    return d if d in DTYPES else fallback


def export_merged(run_dir: str, output_dir: str, merge: bool = True, dtype: str = "auto",
                  overwrite: bool = False) -> str:
    """Write the run's model: the adapter (with the tokenizer) or, merged, a full model folder in `dtype`
    (auto: the base checkpoint's own dtype). Returns the dtype written."""
    from zoft.loading import DTYPES

    if dtype != "auto" and dtype not in DTYPES:
        raise ZoftError(f"--dtype {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
    cfg = load_run_config(run_dir)
    if merge and cfg.zo.mode == "prefix":
        raise ZoftError(f"{run_dir} trained a prefix (--mode prefix): key/value prefixes cannot be folded into the "
                        "weights; run zoft export without --merge to save the adapter (peft loads it)")
    rundir.check_target(output_dir, overwrite=overwrite, marker=MARKER, what="export", model=cfg.model.model,
                        run=run_dir)
    src = trained_dir(run_dir)
    tmp = rundir.staging(output_dir)
    try:
        written = _write(cfg, src, tmp, merge, dtype)
        rundir.write_json(os.path.join(tmp, MARKER), {"run": os.path.abspath(run_dir), "from": os.path.basename(src),
                                                      "merged": merge or cfg.zo.mode == "full"})
        rundir.publish(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


def _write(cfg: TrainConfig, src: str, out: str, merge: bool, dtype: str) -> str:
    from zoft.loading import DTYPES, load_tokenizer, resolve

    if cfg.zo.mode in ("lora", "prefix") and not merge:
        shutil.copytree(src, out, dirs_exist_ok=True)
        for name in ("state.json", "undo.safetensors"):  # a checkpoint's own files are no part of an adapter
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        load_tokenizer(resolve(resolve_alias(cfg.model.model))).save_pretrained(out)
        return "float32"  # LoRA factors and prefixes are trained and saved in float32
    cfg.model.device, cfg.model.dtype = "cpu", "float32"  # merge in float32, then cast once
    s = load_session(cfg.model)
    dtype = base_dtype(s.folder, "float32") if dtype == "auto" else dtype
    attach(s, cfg.zo)
    if s.loras is not None:
        load_peft_weights(s.loras, src)
        merge_lora(s.model)
    else:
        tensors = load_tensors(os.path.join(src, "trained.safetensors"), f"the run's {src} is damaged")
        with torch.no_grad():
            for n, t in zip(s.trainable.names, s.trainable.tensors):
                t.copy_(tensors[n])
    s.model.to(DTYPES[dtype])
    if s.native:
        sd = {k: v.contiguous() for k, v in s.model.state_dict().items()}
        if s.model.args.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(s.folder, "config.json")) as f:
            hf_cfg = json.load(f)
        hf_cfg.pop("torch_dtype", None)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(hf_cfg | {"dtype": dtype}, f, indent=2)
    else:
        s.model.save_pretrained(out)
    s.tokenizer.save_pretrained(out)
    return dtype
