"""`zoft replay`: a run's trained parameters rebuilt from the base weights and its step log alone.
"""

from __future__ import annotations

import math
import os
import shutil
import sys

import torch
from tqdm import tqdm

from zoft.config import TrainConfig
from zoft.errors import ZoftError
from zoft.session import attach, load_session
from zoft.train import rundir, steplog
from zoft.train.checkpoint import save_trained
from zoft.train.resume import model_fingerprint
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import lr_at


def replay(model: str, log_path: str, output_dir: str, device: str = "", overwrite: bool = False) -> dict:
    """Rebuild a run's trained parameters from the base weights and its step log alone, after checking that
    the log's header describes its records and `model` is the model the run trained. Written whole, and
    never with non-finite values."""
    if not os.path.isfile(log_path):
        raise ZoftError(f"step log {log_path} does not exist")
    rundir.check_target(output_dir, overwrite=overwrite, marker=rundir.CONFIG, what="replay", model=model,
                        run=os.path.dirname(os.path.abspath(log_path)))
    header, records = steplog.read(log_path)
    if header is None:
        raise ZoftError(f"{log_path} has no header line; is it a zoft steps.jsonl?")
    resolved = header.pop("resolved", {})
    cfg = TrainConfig.from_dict(header)
    check_log_records(cfg, resolved, records, log_path)
    cfg.model.model = model
    cfg.model.device = device or resolved.get("device", "cpu").split(":")[0]
    s = load_session(cfg.model)
    found = {"model_fingerprint": model_fingerprint(s.model)}
    attach(s, cfg.zo, cfg.run.seed)
    found |= {"path": s.path, "trainable_parameters": s.trainable.n_trained()}
    for key, value in found.items():
        if key in resolved and resolved[key] != value:
            raise ZoftError(f"{log_path} was written by a run of another model ({key} {resolved[key]!r}, --model {model} "
                            f"gives {value!r}); pass the base model the run trained ({header['model']['model']})")
    todo = steplog.effective(records)
    for r in tqdm(todo, desc="replay", unit="step", disable=not sys.stderr.isatty()):
        steplog.apply(s.trainable, r, s.full_step if cfg.zo.mode == "full" else "rows", cfg.zo.eps_value,
                      cfg.zo.weight_decay, s.method)
    if not all(torch.isfinite(t).all() for t in s.trainable.tensors):
        raise ZoftError(f"replaying {log_path} gives non-finite parameters; nothing was saved (the log records a "
                        "diverged run: replay a copy cut before the divergence)")
    tmp = rundir.staging(output_dir)
    try:
        save_trained(s, tmp)
        rundir.write_json(os.path.join(tmp, rundir.CONFIG), header | {"resolved": resolved})
        rundir.publish(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"steps_replayed": len(todo), "output_dir": output_dir}


def check_log_records(cfg: TrainConfig, resolved: dict, records: list[dict], log_path: str) -> None:
    """The records must be the ones the header's run draws: each step's direction seeds follow from the run
    seed, and each learning rate is the header's schedule times a guard factor in (0, 1]."""
    zc, rc = cfg.zo, cfg.run
    n_dirs = zc.directions * (resolved.get("world_size", 1) if zc.spread_directions else 1)
    for r in records:
        if "revert_to" in r:
            continue
        want = direction_seeds(rc.seed, r["step"], n_dirs)
        if r["seeds"] != want:
            raise ZoftError(f"{log_path}: the record of step {r['step']} has seeds {r['seeds']}, but its header's run "
                            f"(--seed {rc.seed}, --directions {zc.directions}) draws {want}: the header comes from "
                            "another run")
        top = lr_at(r["step"], rc.steps, zc.lr_value, zc.schedule, zc.warmup)
        if not (math.isfinite(r["lr"]) and 0 <= r["lr"] <= top * (1 + 1e-9)):
            raise ZoftError(f"{log_path}: the record of step {r['step']} has lr {r['lr']!r}, which its header's "
                            f"schedule (--lr {zc.lr_value:g}, {zc.schedule}) can't give: the header comes from "
                            "another run, or the log was edited")
