"""`zoft export RUN_DIR --merge --output-dir DIR`: a Hugging Face model folder with the training folded in.

The folder is built beside DIR and renamed into place once complete, so a killed export leaves no
half-written model that loads. DIR must be new or empty, or an earlier export (--overwrite-output-dir).
"""

from __future__ import annotations

import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from zoft import rundir
from zoft.config import TrainConfig
from zoft.errors import ZoftError
from zoft.lora import load_peft_weights, merge_lora
from zoft.session import attach, load_session

MARKER = "zoft_export.json"  # what the export came from; marks the folder as zoft's to replace


def load_run_config(run_dir: str) -> TrainConfig:
    d = rundir.read_run_config(run_dir)
    if d is None:
        raise ZoftError(f"{run_dir} is not a zoft run folder (no {rundir.CONFIG}); pass the --output-dir of a zoft "
                        "train run")
    d.pop("resolved", None)
    return TrainConfig.from_dict(d)


def trained_dir(run_dir: str) -> str:
    for name in ("adapter", "best", "checkpoint"):
        d = os.path.join(run_dir, name)
        if os.path.isdir(d):
            return d
    raise ZoftError(f"{run_dir} holds no adapter, best or checkpoint folder; did the run save anything?")


def export_merged(run_dir: str, output_dir: str, merge: bool = True, overwrite: bool = False) -> None:
    cfg = load_run_config(run_dir)
    rundir.check_target(output_dir, overwrite=overwrite, marker=MARKER, what="export", model=cfg.model.model,
                        run=run_dir)
    src = trained_dir(run_dir)
    tmp = rundir.staging(output_dir)
    try:
        _write(cfg, src, tmp, merge)
        rundir.write_json(os.path.join(tmp, MARKER), {"run": os.path.abspath(run_dir), "from": os.path.basename(src),
                                                      "merged": merge or cfg.zo.mode == "full"})
        rundir.publish(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(cfg: TrainConfig, src: str, out: str, merge: bool) -> None:
    if cfg.zo.mode == "lora" and not merge:
        shutil.copytree(src, out, dirs_exist_ok=True)
        for name in ("state.json", "undo.safetensors"):  # a checkpoint's own files are no part of an adapter
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        return
    cfg.model.device = "cpu"
    s = load_session(cfg.model)
    attach(s, cfg.zo)
    if s.loras is not None:
        load_peft_weights(s.loras, src)
        merge_lora(s.model)
    else:
        tensors = load_file(os.path.join(src, "trained.safetensors"))
        with torch.no_grad():
            for n, t in zip(s.trainable.names, s.trainable.tensors):
                t.copy_(tensors[n])
    if s.native:
        sd = {k: v.contiguous() for k, v in s.model.state_dict().items()}
        if s.model.args.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(os.path.join(s.folder, "config.json"), os.path.join(out, "config.json"))
    else:
        s.model.save_pretrained(out)
    s.tokenizer.save_pretrained(out)
