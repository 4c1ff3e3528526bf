"""The training loop, written out: sample a batch, estimate g, update, log, evaluate, checkpoint.

Every step is a pure function of (parameters, step index, run seed): the batch comes from a
per-epoch permutation seeded by (seed, epoch), the directions from (seed, step). That is what makes
--resume exact: restoring the parameters and the step index restores the run.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from zoft.config import TrainConfig
from zoft.engine import row_losses
from zoft.errors import ZoftError
from zoft.evaluate import evaluate, write_predictions
from zoft.lora import load_peft_weights, save_peft
from zoft.session import Session, attach, describe, load_session, log, make_engine
from zoft.tasks import get_task, sample_splits
from zoft.tasks.encode import Encoded, encode
from zoft.zo import direction_seeds, inplace_step, lr_at, rows_step, sgd_update_


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Examples for `step`: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    out, pos = [], step * batch_size
    while len(out) < batch_size:
        epoch, off = divmod(pos, n)
        perm = list(range(n))
        random.Random(seed * 100003 + epoch).shuffle(perm)
        take = perm[off : off + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


def load_data(cfg: TrainConfig, s: Session) -> tuple[dict[str, list[Encoded]], dict, str]:
    tc = cfg.task
    task = get_task(tc.task, data_dir=tc.data_dir or None, template=tc.template or None)
    splits = sample_splits(task, tc.n_train, tc.n_dev, tc.n_test, cfg.run.seed, tc.k_shot or None)
    enc = {}
    for name, exs in splits.items():
        enc[name], n_trunc = encode(s.tokenizer, exs, s.max_length, cfg.model.truncation)
        if n_trunc:
            log(f"zoft: {name}: {n_trunc} of {len(exs)} prompts truncated from the left to {s.max_length} tokens")
    if not enc["train"]:
        raise ZoftError(f"task {tc.task} gave no training examples; check --n-train / --k-shot and the data")
    loss = tc.loss if tc.loss != "auto" else ("candidate" if task.kind == "mc" else "lm")
    if loss == "candidate" and task.kind != "mc":
        raise ZoftError(f"--loss candidate needs a multiple-choice task; {tc.task} is generation: use --loss lm")
    return enc, splits, loss


def step_losses(engine, s: Session, batch: list[Encoded], loss: str, seeds: list[int], eps: float):
    """L₊, L₋ per direction and the projected gradients for one batch."""
    b = engine.batch(batch, gold_only=(loss == "lm"))
    logits_only = loss == "candidate" and b.single_token
    if s.loras is not None:
        fn = lambda rows: row_losses(engine.scores(b, rows, logits_only), b, loss)
        return rows_step(fn, s.loras, seeds, eps)
    fn = lambda: row_losses(engine.scores(b, 1, logits_only), b, loss)[0]
    return inplace_step(fn, s.trainable, seeds, eps)


# ---- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(s: Session, path: str, state: dict) -> None:
    """Atomically replace `path` with the trained parameters and `state` (write aside, then rename)."""
    for t in s.trainable.tensors:
        if not torch.isfinite(t).all():
            raise ZoftError(f"refusing to save non-finite parameters to {path}; the last good checkpoint is kept")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if s.loras is not None:
        save_peft(s.loras, tmp, s.source, s.target_names, s.lora_args)
    else:
        tensors = {n: t.detach().float().cpu().contiguous() for n, t in zip(s.trainable.names, s.trainable.tensors)}
        save_file(tensors, os.path.join(tmp, "trained.safetensors"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(s: Session, path: str) -> dict:
    if s.loras is not None:
        load_peft_weights(s.loras, path)
    else:
        tensors = load_file(os.path.join(path, "trained.safetensors"))
        with torch.no_grad():
            for n, t in zip(s.trainable.names, s.trainable.tensors):
                t.copy_(tensors[n])
    with open(os.path.join(path, "state.json")) as f:
        return json.load(f)


# ---- the loop ----------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    rc, zc = cfg.run, cfg.zo
    out = rc.output_dir
    ckpt = os.path.join(out, "checkpoint")
    if os.path.isdir(ckpt) and not rc.resume:
        raise ZoftError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --output-dir")
    if rc.resume and not os.path.isdir(ckpt):
        raise ZoftError(f"--resume: no checkpoint in {out}; run without --resume to start")
    os.makedirs(out, exist_ok=True)
    t_start = time.time()

    s = load_session(cfg.model)
    attach(s, zc)
    engine = make_engine(s, rc.cache_mb, rc.pack_tokens)
    eps, base_lr = zc.eps_value, zc.lr_value
    resolved = cfg.to_dict() | {"resolved": {"eps": eps, "lr": base_lr, "path": s.path, "device": s.device,
                                             "trainable_parameters": s.trainable.numel(), "layers": s.layers}}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(resolved, f, indent=2)
    log(describe(s, engine))
    log(f"zoft: training {s.trainable.numel():,} parameters ({zc.mode}), ε={eps:g}, lr={base_lr:g}")

    enc, _, loss = load_data(cfg, s)
    log(f"zoft: task {cfg.task.task}: {len(enc['train'])} train / {len(enc['dev'])} dev / {len(enc['test'])} test, loss={loss}")

    start, best_dev, zero_shot = 0, -1.0, None
    if rc.resume:
        state = load_checkpoint(s, ckpt)
        start, best_dev, zero_shot = state["step"], state.get("best_dev", -1.0), state.get("zero_shot_accuracy")
        log(f"zoft: resumed from {ckpt} at step {start}")
    elif rc.zero_shot and enc["test"]:
        zero_shot = evaluate(engine, enc["test"], rc.eval_batch_size, desc="zero-shot eval")["accuracy"]
        log(f"zoft: zero-shot test accuracy {zero_shot:.4f}")

    metrics = open(os.path.join(out, "metrics.jsonl"), "a")
    bar = tqdm(range(start, rc.steps), initial=start, total=rc.steps, desc="train", unit="step", dynamic_ncols=True)
    ema, t_loop = None, time.time()
    train_set = enc["train"]
    for step in bar:
        t0 = time.time()
        lr = lr_at(step, rc.steps, base_lr, zc.schedule, zc.warmup)
        batch = [train_set[i] for i in batch_indices(step, min(zc.batch_size, len(train_set)), len(train_set), rc.seed)]
        seeds = direction_seeds(rc.seed, step, zc.directions)
        lp, lm, grads = step_losses(engine, s, batch, loss, seeds, eps)
        loss_val = float((lp + lm).mean() / 2)
        if not all(math.isfinite(x) for x in grads + [loss_val]):
            save_checkpoint(s, ckpt, {"step": step, "best_dev": best_dev, "zero_shot_accuracy": zero_shot})
            raise ZoftError(f"non-finite loss at step {step}; parameters before it are saved in {ckpt}: "
                            "lower --lr or --eps and run again with --resume")
        sgd_update_(s.trainable, seeds, grads, lr, zc.weight_decay)
        dt = time.time() - t0
        ema = loss_val if ema is None else 0.95 * ema + 0.05 * loss_val
        g_mean = sum(grads) / len(grads)
        metrics.write(json.dumps({"step": step + 1, "loss": loss_val, "projected_grad": g_mean, "lr": lr,
                                  "seconds": round(time.time() - t_start, 3), "step_seconds": round(dt, 4)}) + "\n")
        metrics.flush()
        bar.set_postfix(loss=f"{ema:.4f}", g=f"{g_mean:+.3g}", s_step=f"{dt:.2f}")
        done = step + 1
        if rc.log_every and done % rc.log_every == 0:
            st = engine.stats.summary()
            bar.write(f"step {done}: token×layer work {st['token_layers_computed']:,} computed vs "
                      f"{st['token_layers_naive']:,} naive two-pass ({st['work_saved']:.1%} saved)"
                      + (f", prefix-cache hits {st['prefix_cache_hit_rate']:.1%}" if st["prefix_cache_hit_rate"] else ""))
        if rc.eval_every and done % rc.eval_every == 0 and enc["dev"]:
            dev = evaluate(engine, enc["dev"], rc.eval_batch_size)["accuracy"]
            metrics.write(json.dumps({"step": done, "dev_accuracy": dev}) + "\n")
            bar.write(f"step {done}: dev accuracy {dev:.4f}" + (" (best)" if dev > best_dev else ""))
            if dev > best_dev:
                best_dev = dev
                save_checkpoint(s, os.path.join(out, "best"), {"step": done, "dev_accuracy": dev})
        if (rc.save_every and done % rc.save_every == 0) or done == rc.steps:
            save_checkpoint(s, ckpt, {"step": done, "best_dev": best_dev, "zero_shot_accuracy": zero_shot})
    bar.close()
    metrics.close()
    train_seconds = time.time() - t_loop

    if best_dev >= 0:
        load_checkpoint(s, os.path.join(out, "best"))
    result = {"zero_shot_accuracy": zero_shot, "steps": rc.steps, "best_dev_accuracy": best_dev if best_dev >= 0 else None}
    if enc["test"]:
        ev = evaluate(engine, enc["test"], rc.eval_batch_size, desc="test eval")
        write_predictions(os.path.join(out, "test_predictions.jsonl"), ev["rows"])
        result["final_accuracy"] = ev["accuracy"]
    if s.loras is not None:
        save_peft(s.loras, os.path.join(out, "adapter"), s.source, s.target_names, s.lora_args)
    result |= {"seconds": round(time.time() - t_start, 1), "train_seconds": round(train_seconds, 1),
               "seconds_per_step": round(train_seconds / max(1, rc.steps - start), 4),
               "path": s.path, "output_dir": out, **engine.stats.summary()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result
