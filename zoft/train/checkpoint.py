"""Checkpoints: the trained parameters and the loop's state, written aside and swapped in whole (a kill
leaves the old one or the new one, never half of each), checked by checksums on load; the final adapter,
and the undo the divergence guard needs.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from zoft.errors import ZoftError
from zoft.evaluate import evaluate_split, write_predictions
from zoft.files import checkpoint_fix, load_tensors, read_checkpoint, sha256
from zoft.lora import load_peft_weights, save_peft
from zoft.prefix import load_prefix, save_prefix
from zoft.session import Session, peft_base
from zoft.train import rundir, steplog
from zoft.train.data import metric_of


def save_trained(s: Session, folder: str) -> None:
    """The trained parameters: a PEFT adapter (LoRA, prefix) or trained.safetensors (full mode)."""
    os.makedirs(folder, exist_ok=True)
    if s.loras is not None:
        save_peft(s.loras, folder, peft_base(s.source, s.folder), s.target_names, s.lora_args)
    elif s.prefix is not None:
        save_prefix(s.prefix, folder, peft_base(s.source, s.folder))
    else:
        tensors = {n: t.detach().cpu().contiguous() for n, t in zip(s.trainable.names, s.trainable.tensors)}  # as trained
        save_file(tensors, os.path.join(folder, "trained.safetensors"))


def save_checkpoint(s: Session, path: str, state: dict, undo: torch.Tensor | None = None,
                    undo_state: dict | None = None) -> None:
    """Atomically replace `path` with the trained parameters and `state` (write aside, then rename).
    undo (LoRA): the parameters before the last update, which the divergence guard restores. A --optimizer
    method's state goes in optimizer.safetensors ("state.*"), with undo_state, its state before that update
    ("undo.*")."""
    for t in s.trainable.tensors:
        if not torch.isfinite(t).all():
            raise ZoftError(f"refusing to save non-finite parameters to {path}; the last good checkpoint is kept")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_trained(s, tmp)
    if undo is not None:
        save_file({"flat": undo.detach().cpu().contiguous()}, os.path.join(tmp, "undo.safetensors"))
    if s.method is not None:
        parts = [("state", s.method.state_dict())] + ([("undo", undo_state)] if undo_state is not None else [])
        save_file({f"{p}.{k}": v.detach().cpu().contiguous() for p, d in parts for k, v in d.items()},
                  os.path.join(tmp, OPTIMIZER))
    # checksums of what was just written: a checkpoint damaged later is refused on load, not resumed from
    state = state | {"sha256": {name: sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    swap_in(tmp, path)


def swap_in(tmp: str, path: str) -> None:
    """Put the complete folder `tmp` in place of `path`: path → path.old, tmp → path, remove path.old.
    A kill leaves path whole, or only path.old whole (recover_checkpoint puts it back)."""
    old = path + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)  # left by a kill during an earlier swap's cleanup
        os.replace(path, old)
    os.replace(tmp, path)
    rundir.fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(path: str) -> None:
    """Finish or undo a swap that a kill interrupted (swap_in). path whole: drop the leftovers. Only
    path.old: it is the last whole one, put it back (the step log replays whatever came after it)."""
    old = path + ".old"
    if not os.path.isdir(path) and os.path.isdir(old):
        os.replace(old, path)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(path + ".tmp", ignore_errors=True)


def load_checkpoint(s: Session, path: str, need: tuple[str, ...] = (), verify: bool = True) -> dict:
    """Load a checkpoint's parameters; returns its state. A damaged checkpoint (state.json missing, malformed,
    lacking a key in `need`, or a file whose checksum differs) is a ZoftError: resuming from it would be wrong.
    verify=False: the checksums were checked already (resume.prepare, before anything was written)."""
    state = read_checkpoint(path, need, verify)
    fix = checkpoint_fix(path)
    if s.method is not None:
        s.method.load_state_dict(_optimizer_part(s, path, "state"))
    if s.loras is not None:
        load_peft_weights(s.loras, path)
    elif s.prefix is not None:
        load_prefix(s.prefix, path)
    else:
        tensors = load_tensors(os.path.join(path, "trained.safetensors"), fix)
        with torch.no_grad():
            for n, t in zip(s.trainable.names, s.trainable.tensors):
                if n not in tensors or tensors[n].shape != t.shape:
                    raise ZoftError(f"{path}/trained.safetensors lacks {n} or has another shape; {fix}")
                t.copy_(tensors[n])
    return state


def load_undo(s: Session, path: str) -> torch.Tensor | None:
    """The copy the guard restores (LoRA, prefix), as the checkpoint saved it; None if it saved none."""
    f = os.path.join(path, "undo.safetensors")
    if not s.trainable.flat or not os.path.isfile(f):
        return None
    return load_tensors(f, checkpoint_fix(path))["flat"].to(s.trainable.tensors[0].device)


OPTIMIZER = "optimizer.safetensors"


def _optimizer_part(s: Session, path: str, part: str) -> dict | None:
    """The method's tensors saved under `part` ("state" or "undo"); None for an undo never saved."""
    f = os.path.join(path, OPTIMIZER)
    if not os.path.isfile(f):
        raise ZoftError(f"{path} holds no {OPTIMIZER}, the state of --optimizer {s.method.name}; it was written by "
                        "another optimizer's run: resume with that run's --optimizer")
    saved = load_tensors(f, checkpoint_fix(path))
    d = {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith(part + ".")}
    if part == "state" and set(d) != set(s.method.state):
        raise ZoftError(f"{f} holds {sorted(d)}, not the state of --optimizer {s.method.name} "
                        f"({sorted(s.method.state)}); {checkpoint_fix(path)}")
    return d or None


def load_undo_state(s: Session, path: str) -> dict | None:
    """The method's state before the last update (what the guard restores with load_undo's copy)."""
    if s.method is None or not os.path.isfile(os.path.join(path, "undo.safetensors")):
        return None
    return _optimizer_part(s, path, "undo") or {}


def open_metrics(path: str, keep_to: int | None):
    """metrics.jsonl for appending. keep_to (--resume): keep the rows up to the checkpoint's step; the
    steps replayed from the log write theirs again, so no step has two rows and none is missing."""
    if keep_to is None:
        return open(path, "w")
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= keep_to:
                        rows.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):
                    pass  # a row torn by the kill
    rundir.write_atomic(path, "".join(rows))
    return open(path, "a")


def logged_train_seconds(path: str) -> float:
    """The training seconds of the last step row in metrics.jsonl (--resume goes on counting from there)."""
    last = 0.0
    with open(path) as f:
        for line in f:
            try:
                last = json.loads(line).get("train_seconds", last)
            except ValueError:
                pass  # a row torn by a kill
    return last


def finish(s: Session, engine, enc: dict, splits: dict, out: str, eval_batch_size: int, best_dev: float) -> dict:
    """After training: the best dev checkpoint (if any) on the test set, predictions and the adapter."""
    if best_dev >= 0:
        load_checkpoint(s, os.path.join(out, "best"))
    metric = metric_of(splits)
    result = {f"best_dev_{metric}": best_dev if best_dev >= 0 else None, "metric": metric}
    if enc["test"]:
        ev = evaluate_split(engine, s, enc["test"], splits["test"], eval_batch_size, desc="test eval")
        write_predictions(os.path.join(out, "test_predictions.jsonl"), ev["rows"])
        result |= {"final_f1": ev["f1"], "final_exact_match": ev["em"]} if metric == "f1" else {"final_accuracy": ev["score"]}
    if s.loras is not None or s.prefix is not None:
        tmp = os.path.join(out, "adapter.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_trained(s, tmp)
        swap_in(tmp, os.path.join(out, "adapter"))
    return result


def keep_numbered(ckpt: str, step: int, limit: int) -> str:
    """RUN/checkpoint-STEP/: checkpoint/ as it is now, for users who keep a history of checkpoints (as the
    Hugging Face Trainer does), made of hard links to its files (a save writes new files, so the links keep
    this one's) and published by one rename; only the newest `limit` stay. Resume reads checkpoint/."""
    parent = os.path.dirname(ckpt)
    dst = os.path.join(parent, f"checkpoint-{step}")
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in os.listdir(ckpt):
        try:
            os.link(os.path.join(ckpt, name), os.path.join(tmp, name))
        except OSError:  # a file system without hard links: a copy
            shutil.copy2(os.path.join(ckpt, name), os.path.join(tmp, name))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    numbered = sorted((int(n.split("-", 1)[1]), n) for n in os.listdir(parent)
                      if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit())
    for _, name in numbered[:-limit]:
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    return dst


def undo_last(s: Session, ckpt: str, prev: torch.Tensor | None, applied: int, eps: float = 0.0,
              weight_decay: float = 0.0) -> int:
    """Undo exactly the last of `applied` updates. LoRA restores the copy taken before it (without one, after a
    second strike in a row, it goes back to the checkpoint and returns its count). Full mode has no
    copy (it would be a second model): rewind() to the updates before it."""
    if prev is not None:
        restore_copy(s, prev)
        return applied - 1
    if s.trainable.flat:  # LoRA (or prefix) without its copy (a second strike in a row): back to the checkpoint, as ever
        return load_checkpoint(s, ckpt)["applied"]
    rewind(s, ckpt, applied - 1, eps, weight_decay)
    return applied - 1


def restore_copy(s: Session, flat: torch.Tensor) -> None:
    """LoRA: the trained tensors from a flat copy of them (pipeline.snapshot)."""
    with torch.no_grad():
        parts = flat.split([t.numel() for t in s.trainable.tensors])
        torch._foreach_copy_([t.data for t in s.trainable.tensors],
                             [p.view_as(t).to(t.dtype) for p, t in zip(parts, s.trainable.tensors)])


def rewind(s: Session, ckpt: str, n: int, eps: float = 0.0, weight_decay: float = 0.0) -> None:
    """Full mode: θ bitwise as it was after the run's first n (effective) logged updates, whatever was applied
    since (a suspect update, updates the pipelined loop queued): reload the checkpoint and redo the logged
    updates after it up to n, with the arithmetic training did (steplog.apply). When the checkpoint holds
    more than n (one was saved just after the suspect), start from the base weights instead and redo the
    first n, as `zoft replay` does."""
    start = load_checkpoint(s, ckpt)["applied"]
    if start > n:
        load_base_weights(s)
        start = 0
    _, records = steplog.read(os.path.join(os.path.dirname(ckpt), "steps.jsonl"))
    for r in steplog.effective(records)[start:n]:
        steplog.apply(s.trainable, r, s.full_step or "rows", eps, weight_decay)


def load_base_weights(s: Session) -> None:
    """The trained tensors' values as the model was loaded: its checkpoint's tensors, rounded to the load
    dtype and then to the trained tensors' (a float32 master holds the loaded dtype's values)."""
    from zoft.loading import load_state_dict, map_name

    family = getattr(s.model, "family", None)
    index = {n: t for n, t in zip(s.trainable.names, s.trainable.tensors)}
    loaded = 0
    with torch.no_grad():
        for name, t in load_state_dict(s.folder).items():
            key = map_name(family, name) if family else name
            if key in index:
                index[key].copy_(t.to(s.load_dtype).to(index[key].dtype))
                loaded += 1
    if loaded != len(index):
        raise ZoftError(f"{s.folder} gave {loaded} of the {len(index)} trained tensors' base values; the guard cannot "
                        "undo the last update exactly: continue with --resume and a lower --lr")
