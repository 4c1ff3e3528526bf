"""`zoft export RUN_DIR --merge --output-dir DIR`: a Hugging Face model folder with the training folded in."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from zoft.config import TrainConfig
from zoft.errors import ZoftError
from zoft.lora import load_peft_weights, merge_lora
from zoft.session import attach, load_session


def load_run_config(run_dir: str) -> TrainConfig:
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ZoftError(f"{run_dir} is not a zoft run folder (no config.json); pass the --output-dir of a zoft train run")
    with open(path) as f:
        d = json.load(f)
    d.pop("resolved", None)
    return TrainConfig.from_dict(d)


def trained_dir(run_dir: str) -> str:
    for name in ("adapter", "best", "checkpoint"):
        d = os.path.join(run_dir, name)
        if os.path.isdir(d):
            return d
    raise ZoftError(f"{run_dir} holds no adapter, best or checkpoint folder; did the run save anything?")


def export_merged(run_dir: str, output_dir: str, merge: bool = True) -> None:
    cfg = load_run_config(run_dir)
    src = trained_dir(run_dir)
    if cfg.zo.mode == "lora" and not merge:
        shutil.copytree(src, output_dir, dirs_exist_ok=True)
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
    os.makedirs(output_dir, exist_ok=True)
    if s.native:
        sd = {k: v.contiguous() for k, v in s.model.state_dict().items()}
        if s.model.args.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        save_file(sd, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        shutil.copy(os.path.join(s.folder, "config.json"), os.path.join(output_dir, "config.json"))
    else:
        s.model.save_pretrained(output_dir)
    s.tokenizer.save_pretrained(output_dir)
