"""The first-order baseline: the same model, data, templates, loss and evaluation, trained with
backpropagation and AdamW, so that accuracy, memory and time compare like for like with MeZO."""

from __future__ import annotations

import json
import os
import resource
import time

import torch

from zoft import tracking
from zoft.card import write_model_card
from zoft.config import TrainConfig
from zoft.errors import ZoftError
from zoft.evaluate import evaluate_split, evaluation_row
from zoft.session import attach, describe, load_session, log, make_engine, peft_base, progress
from zoft.train import rundir
from zoft.train.checkpoint import finish, save_checkpoint
from zoft.train.data import batch_indices, load_data, metric_of, write_splits
from zoft.train.losses import row_losses
from zoft.zo.update import lr_at


def peak_memory(device: str) -> dict:
    """Peak memory so far: CUDA allocator peak on GPU, the process's peak RSS on CPU (includes the runtime)."""
    if str(device).startswith("cuda"):
        return {"peak_memory_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1), "peak_memory_kind": "cuda_allocated"}
    return {"peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "peak_memory_kind": "cpu_rss"}


def adamw(s, weight_decay: float, lr: float) -> torch.optim.AdamW:
    """AdamW over every tensor that trains (LoRA-FA's A factors stay frozen here too), decay where zoft decays."""
    tr = s.trainable
    trained = [(t, d) for t, d, f in zip(tr.tensors, tr.decay, tr.fixed or [False] * len(tr.tensors)) if not f]
    for t, _ in trained:
        t.requires_grad_(True)
    return torch.optim.AdamW([{"params": [t for t, d in trained if d], "weight_decay": weight_decay},
                              {"params": [t for t, d in trained if not d], "weight_decay": 0.0}], lr=lr)


def train_backprop(cfg: TrainConfig, plan, callbacks=()) -> dict:
    """The first-order baseline. `plan`: zoft.train.resume.prepare's checks of the output folder and the data,
    already passed (read before the model loaded)."""
    rc, zc = cfg.run, cfg.zo
    if cfg.model.attention == "varlen":
        raise ZoftError("--optimizer adamw runs attention through the mask path (its backward is the tested one); "
                        "drop --attention varlen")
    out = rc.output_dir
    t_start = time.time()
    s = load_session(cfg.model)
    attach(s, zc, rc.seed)
    # no frozen-prefix cache: its stored activations carry no graph, and the baseline should be plain;
    # attention through the mask path, whose backward is the tested one
    engine = make_engine(s, 0.0, rc.pack_tokens, varlen=False)
    lr = zc.lr_value
    rundir.write_json(os.path.join(out, rundir.CONFIG), cfg.to_dict() | {"resolved": {
        "lr": lr, "path": s.path, "device": s.device, "base": peft_base(s.source, s.folder),
        "trainable_parameters": s.trainable.n_trained()}})
    write_splits(out, cfg, plan)
    log(describe(s, engine, zo=False) + "; first-order baseline: backprop + AdamW")
    enc, splits, loss = load_data(cfg, s, plan)
    if loss == "f1":
        raise ZoftError("--loss f1 is not differentiable: use it with the zo-sgd optimizer, or --loss lm with adamw")
    zero_shot = evaluate_split(engine, s, enc["test"], splits["test"], rc.eval_batch_size, desc="zero-shot eval")["score"] if (
        rc.zero_shot and enc["test"]) else None
    opt = adamw(s, zc.weight_decay, lr)
    if str(s.device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(s.device)
    train_set, best_dev, t_loop, paused = enc["train"], -1.0, time.time(), 0.0
    metrics = open(os.path.join(out, "metrics.jsonl"), "a")
    reporters = tracking.Reporters(rc.report_to, out, cfg.to_dict(), callbacks)

    def emit(row: dict) -> None:
        metrics.write(json.dumps(row) + "\n")
        reporters.log(row)
    bar = progress(iterable=range(rc.steps), desc="train (adamw)", unit="step", dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, rc.steps, lr, zc.schedule, zc.warmup)
        batch = [train_set[i] for i in batch_indices(step, min(zc.batch_size, len(train_set)), len(train_set), rc.seed)]
        b = engine.batch(batch, gold_only=(loss == "lm"))
        value = row_losses(engine.scores(b, 1, loss == "candidate" and b.single_token, grad=True), b, loss)[0]
        if not torch.isfinite(value):
            raise ZoftError(f"non-finite loss at step {step + 1}; lower --lr")
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        bar.set_postfix(loss=f"{value.item():.4f}", refresh=False)
        emit({"step": step + 1, "loss": value.item(), "lr": opt.param_groups[0]["lr"],
              "forwards": step + 1,  # one forward (and one backward) a step
              "seconds": round(time.time() - t_start, 3), "train_seconds": round(time.time() - t_loop - paused, 3)})
        done, t0 = step + 1, time.time()
        if rc.eval_every and done % rc.eval_every == 0 and enc["dev"]:
            row = evaluation_row(engine, s, enc, splits, done, rc.eval_batch_size, rc.eval_test)
            emit(row | s.trainable.norms())
            if row[f"dev_{metric_of(splits)}"] > best_dev:
                best_dev = row[f"dev_{metric_of(splits)}"]
                save_checkpoint(s, os.path.join(out, "best"), {"step": done, "dev_score": best_dev})
        paused += time.time() - t0  # evaluations are not training time
    bar.close()
    metrics.close()
    reporters.close()
    train_seconds, mem = time.time() - t_loop - paused, peak_memory(s.device)
    save_checkpoint(s, os.path.join(out, "checkpoint"), {"next_step": rc.steps, "applied": rc.steps})
    result = finish(s, engine, enc, splits, out, rc.eval_batch_size, best_dev)
    result |= {f"zero_shot_{metric_of(splits)}": zero_shot, "steps": rc.steps, "optimizer": "adamw",
               "seconds": round(time.time() - t_start, 1), "train_seconds": round(train_seconds, 1),
               "seconds_per_step": round(train_seconds / max(1, rc.steps), 4), "path": s.path, **mem,
               "forwards": rc.steps, "trained_parameters": s.trainable.n_trained(),
               "optimizer_state_bytes": sum(v.numel() * v.element_size() for st in opt.state.values()
                                            for v in st.values() if torch.is_tensor(v))}
    if s.loras is not None or s.prefix is not None:
        write_model_card(os.path.join(out, "adapter"), cfg, peft_base(s.source, s.folder), plan.task.name, result)
    rundir.write_json(os.path.join(out, "results.json"), result)
    return result
