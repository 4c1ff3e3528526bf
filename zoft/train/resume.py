"""What `zoft train` checks before it writes anything: the output folder, the data, and on --resume the run.

`prepare` runs before the model loads and writes nothing: it decides whether the folder may be used
(zoft.files, zoft.train.rundir), reads and draws the data (`prepare_data`, so bad data fails in a second), and
on --resume compares the run's saved config and recorded splits with the new flags. `check_loaded` repeats the comparison for what
only the loaded model knows (its weights' fingerprint, the device type, z's backend), still before
the first write.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch

from zoft.config import TrainConfig
from zoft.errors import ZoftError
from zoft.files import check_output_dir, read_checkpoint
from zoft.session import log
from zoft.tasks import Splits, Task, check_splits, draw_splits, load_task
from zoft.tasks.rows import ChatFn
from zoft.train import rundir, steplog


@dataclass
class Plan:
    how: str  # "new", "resume" or "overwrite" (rundir.check_output_dir)
    task: Task
    drawn: Splits
    loss: str  # the loss the task trains with: candidate, lm or f1
    saved: dict | None = None  # resume: the run's resolved config
    state: dict | None = None  # resume: its checkpoint's state.json; None: rebuilt from the step log alone
    logged: list[dict] = field(default_factory=list)  # resume: the step log's records past the checkpoint


def prepare_data(cfg: TrainConfig, chat: ChatFn | None = None, task: Task | None = None) -> tuple[Task, Splits, str]:
    """Read, convert, draw and check the data, and pick the loss: all that needs no model, so bad data
    fails in a second. `task`: data already in hand (the Python API), instead of cfg.task's source."""
    tc = cfg.task
    task = task or load_task(tc, chat)
    drawn = draw_splits(task, tc.n_train, tc.n_dev, tc.n_test, cfg.run.seed, tc.k_shot or None)
    splits = drawn.examples
    asked = {"train": 0 if tc.k_shot else tc.n_train, "test": tc.n_test} | ({"dev": tc.n_dev} if cfg.run.eval_every else {})
    check_splits(task, splits, asked, log)
    if drawn.repeated:
        log(f"zoft: warning: {task.name}: {drawn.repeated} training example(s) repeat a dev or test example of your "
            "own splits (used as given); an evaluation on them is not on unseen examples")
    if cfg.run.eval_every and not splits["dev"]:
        raise ZoftError(f"--eval-every {cfg.run.eval_every} evaluates on the dev split, which came out empty; "
                        "raise --n-dev, pass --validation-file, or drop --eval-every")
    loss = tc.loss if tc.loss != "auto" else ("candidate" if task.kind == "mc" else "lm")
    if loss == "candidate" and task.kind != "mc":
        raise ZoftError(f"--loss candidate needs a multiple-choice task; {task.name} is generation: use --loss lm")
    if loss == "f1" and task.kind != "gen":
        raise ZoftError("--loss f1 needs a generation task and a native model (OPT, Llama family)")
    return task, drawn, loss


def prepare(cfg: TrainConfig, chat: ChatFn | None = None, data: Task | None = None) -> Plan:
    """Every check that needs no model, in the order that names a problem earliest; writes nothing.
    `data`: a task already in hand (the Python API) instead of cfg.task's source."""
    rc, out = cfg.run, cfg.run.output_dir
    check_output_dir(out)  # a file, under a file, read-only
    how = rundir.check_output_dir(out, resume=rc.resume, overwrite=rc.overwrite_output_dir, model=cfg.model.model)
    if rc.resume and cfg.zo.optimizer == "adamw":
        raise ZoftError("--resume supports zo-sgd runs (their step log replays exactly); rerun the adamw baseline")
    saved = state = None
    if how == "resume":  # the flags first: a changed --task or --model is named before it is loaded
        state = checkpoint_state(out)
        saved = rundir.read_run_config(out) or steplog_header(out)
        if saved is None:
            raise ZoftError(f"--resume: {out} holds neither {rundir.CONFIG} nor a step log header; the run "
                            "can't be checked or continued: start a new run with --overwrite-output-dir")
        allow = {"zo.lr"} if (state or {}).get("stopped") else set()  # the guard's stop advises a lower lr
        diffs = rundir.resume_differences(saved, cfg, allow)
        if diffs:
            raise ZoftError(f"--resume: {out} was trained with other settings ({'; '.join(diffs)}); resume with the "
                            f"run's own flags (see {os.path.join(out, rundir.CONFIG)}), or start a new run in "
                            "another --output-dir")
    task, drawn, loss = prepare_data(cfg, chat, data)
    if how == "resume":
        check_recorded_splits(out, drawn)
    plan = Plan(how, task, drawn, loss, saved, state)
    if how == "resume":
        st = state or {"applied": 0, "next_step": 0}  # no checkpoint: every logged step is redone from the base
        plan.logged = logged_since(out, st["applied"], st["next_step"], cfg.model.model)
    return plan


def logged_since(out: str, applied: int, next_step: int, model: str) -> list[dict]:
    """--resume: the step log's records from `next_step` on (what the checkpoint doesn't hold), after checking
    that the log and the checkpoint tell one story: the checkpoint's `applied` updates plus those records
    must be exactly the updates the whole log holds."""
    log_path, ckpt = os.path.join(out, "steps.jsonl"), os.path.join(out, "checkpoint")
    _, records = steplog.read(log_path) if os.path.exists(log_path) else (None, [])
    since = [r for r in records if r["step"] >= next_step]
    n = applied
    for r in since:
        n = r["revert_to"] if "revert_to" in r else n + 1
    held = len(steplog.effective(records))
    if n == held:
        return since
    if held < applied:
        raise ZoftError(f"{log_path} holds {held} updates but {ckpt} holds {applied}: the step log was deleted or "
                        "cut short, and the checkpoint can't be continued exactly without it. Restore the log, or take "
                        f"the checkpoint's parameters as they are with: zoft export {out} --output-dir NEW_DIR")
    raise ZoftError(f"{log_path} does not continue {ckpt} ({held} updates logged, {n} expected from the checkpoint "
                    f"on); rebuild the parameters from the log alone with: zoft replay --model {model} --log "
                    f"{log_path} --output-dir NEW_DIR")


def steplog_header(out: str) -> dict | None:
    path = os.path.join(out, "steps.jsonl")
    if not os.path.isfile(path):
        return None
    header, _ = steplog.read(path)
    return header if rundir.is_run_config(header) else None


def checkpoint_state(out: str) -> dict | None:
    """The state.json that resuming starts from: checkpoint/, or checkpoint.old/ when a kill interrupted a
    swap (train.recover_checkpoint puts it back), checked with its files' checksums: a damaged checkpoint is
    refused here, before anything is written. None when neither is there: the run is rebuilt from its step
    log, from the base weights on."""
    for name in ("checkpoint", "checkpoint.old"):
        path = os.path.join(out, name)
        if os.path.isdir(path) and (name == "checkpoint" or os.path.isfile(os.path.join(path, "state.json"))):
            return read_checkpoint(path, need=("next_step", "applied"))
    return None


def check_recorded_splits(out: str, drawn: Splits) -> None:
    """The data drawn now must be the examples the run recorded (an edited file is another trajectory)."""
    path = os.path.join(out, rundir.SPLITS)
    if not os.path.isfile(path):
        return  # a run from before splits were recorded
    with open(path) as f:
        recorded = json.load(f)["splits"]
    for name, rec in recorded.items():
        if rec["hashes"] != drawn.hashes.get(name):
            raise ZoftError(f"--resume: the {name} split drawn now differs from the one {path} records (the data, "
                            "template or sizes changed); resume with the data the run used, or start a new run")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A cheap identity of the base weights: every tensor's name, shape, dtype and 64 strided values.
    Tells apart two checkpoints of one architecture without hashing gigabytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def check_loaded(saved: dict, resolved: dict, out: str) -> None:
    """--resume, once the model is loaded: the weights, the device type, the z backend and the number of
    trained parameters must be the run's."""
    was, now = saved.get("resolved", {}), resolved["resolved"]
    diffs = []
    if was.get("model_fingerprint") and was["model_fingerprint"] != now["model_fingerprint"]:
        diffs.append(f"--model {saved['model']['model']!r} → {resolved['model']['model']!r} (other weights)")
    if "device" in was and str(was["device"]).split(":")[0] != str(now["device"]).split(":")[0]:
        diffs.append(f"device {was['device']} → {now['device']} (z is drawn per device type)")
    for key in ("z_backend", "trainable_parameters", "path"):
        if key in was and was[key] != now[key]:
            diffs.append(f"{key} {was[key]!r} → {now[key]!r}")
    if diffs:
        raise ZoftError(f"--resume: {out} was trained with another setup ({'; '.join(diffs)}); resume it where and "
                        "how it ran, or start a new run in another --output-dir")
