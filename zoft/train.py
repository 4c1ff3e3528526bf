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
import signal
import statistics
import sys
import time
from collections.abc import Sequence

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from zoft import distributed as dist
from zoft import steplog, tracking
from zoft.backprop import peak_memory
from zoft.card import write_model_card
from zoft.config import TrainConfig
from zoft.engine.native import row_losses
from zoft.errors import Interrupted, ZoftError
from zoft.evaluate import answers_of, evaluate_split, write_predictions
from zoft.files import check_output_dir, load_tensors, read_json, sha256
from zoft.loading import load_tokenizer, resolve
from zoft.lora import load_peft_weights, save_peft
from zoft.models.common import Rows
from zoft.session import (
    Session,
    attach,
    check_lora_targets,
    describe,
    load_session,
    log,
    make_engine,
    peft_base,
    progress,
    resolve_alias,
)
from zoft.tasks import Task, check_splits, load_task, sample_splits
from zoft.tasks.encode import Encoded, encode
from zoft.tasks.rows import ChatFn, chat_renderer
from zoft.tracking import Callback
from zoft.zo.perturbers import estimate
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import lr_at, sgd_update_


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


def prepare_data(cfg: TrainConfig, chat: ChatFn | None = None, task: Task | None = None) -> tuple[Task, dict, str]:
    """Read, convert, sample and check the data, and pick the loss: all that needs no model, so bad data
    fails in a second. `task`: data already in hand (the Python API), instead of cfg.task's source."""
    tc = cfg.task
    task = task or load_task(tc, chat)
    splits = sample_splits(task, tc.n_train, tc.n_dev, tc.n_test, cfg.run.seed, tc.k_shot or None)
    asked = {"train": 0 if tc.k_shot else tc.n_train, "test": tc.n_test} | ({"dev": tc.n_dev} if cfg.run.eval_every else {})
    check_splits(task, splits, asked, log)
    if cfg.run.eval_every and not splits["dev"]:
        raise ZoftError(f"--eval-every {cfg.run.eval_every} evaluates on the dev split, which came out empty; "
                        "raise --n-dev, pass --validation-file, or drop --eval-every")
    loss = tc.loss if tc.loss != "auto" else ("candidate" if task.kind == "mc" else "lm")
    if loss == "candidate" and task.kind != "mc":
        raise ZoftError(f"--loss candidate needs a multiple-choice task; {task.name} is generation: use --loss lm")
    if loss == "f1" and task.kind != "gen":
        raise ZoftError("--loss f1 needs a generation task and a native model (OPT, Llama family)")
    return task, splits, loss


def model_chat(mc) -> ChatFn:
    """Chat rows are rendered with the model's own tokenizer, loaded (without the weights) when first needed."""
    return chat_renderer(lambda: load_tokenizer(resolve(resolve_alias(mc.model))))


def load_data(cfg: TrainConfig, s: Session, prepared: tuple[Task, dict, str] | None = None
              ) -> tuple[dict[str, list[Encoded]], dict, str]:
    """Tokenize the prepared splits (prepare_data's, or prepared here) for the session's model."""
    _, splits, loss = prepared or prepare_data(cfg, chat_renderer(lambda: s.tokenizer))
    if loss == "f1" and not s.native:
        raise ZoftError("--loss f1 needs a generation task and a native model (OPT, Llama family)")
    enc = {}
    for name, exs in splits.items():
        enc[name], n_trunc = encode(s.tokenizer, exs, s.max_length, cfg.model.truncation)
        if n_trunc:
            log(f"zoft: {name}: {n_trunc} of {len(exs)} prompts truncated from the left to {s.max_length} tokens")
    return enc, splits, loss


def f1_row_losses(s: Session, batch: list[Encoded], golds: list[list[str]], rows) -> torch.Tensor:
    """MeZO's non-differentiable objective: −F1 of greedy answers, one decode per perturbation row."""
    from zoft.evaluate import stop_tokens
    from zoft.tasks.metrics import f1

    stop = stop_tokens(s.tokenizer)
    rows = Rows(rows) if isinstance(rows, int) else rows
    total = torch.zeros(rows.P, dtype=torch.float64)
    for e, gold in zip(batch, golds, strict=True):
        for r, out in enumerate(s.model.generate(e.prompt_ids, 50, stop, rows=rows)):
            total[r] += f1(s.tokenizer.decode(out).split("\n")[0].strip(), gold)
    return -total / len(batch)


def pack_batch(engine, batch: list[Encoded], loss: str):
    """The engine's packed batch for `loss` (built on the host; see step_losses' `next_batch`)."""
    return engine.batch(batch, gold_only=(loss == "lm"))


def step_losses(engine, s: Session, batch: list[Encoded], loss: str, seeds: list[int], eps: float,
                golds: list[list[str]] | None = None, reduce: bool = True, packed=None, next_batch=None,
                ahead: dict | None = None, lazy: bool = False):
    """L₊, L₋ per direction and the projected gradients for one batch (this rank's shard of it).
    loss="f1" (generation tasks) needs `golds`, the answers of each example. `packed`: this batch
    already packed (pack_batch). `next_batch`: the next step's examples, packed into ahead["packed"]
    while this step's forward runs (on a GPU the packing overlaps the forward).
    lazy: g is returned as a device tensor and nothing waits for the forward; else a list."""
    if loss == "f1":
        row_fn = lambda rows: f1_row_losses(s, batch, golds, rows)
    else:
        b = packed if packed is not None else pack_batch(engine, batch, loss)
        logits_only = loss == "candidate" and b.single_token
        row_fn = lambda rows: row_losses(engine.scores(b, rows, logits_only, graph=True), b, loss)

    def mean_over_ranks(v: torch.Tensor) -> torch.Tensor:  # (P,) local means -> global means
        if not reduce or dist.world()[1] == 1:
            return v
        tot = dist.all_reduce_sum(torch.cat([v.double() * len(batch), torch.full((1,), float(len(batch)), dtype=torch.float64, device=v.device)]))
        return tot[:-1] / tot[-1]

    early = None
    if next_batch is not None and ahead is not None and loss != "f1":
        early = lambda: ahead.update(packed=pack_batch(engine, next_batch, loss))
    lp, lm, g = estimate(lambda rows: mean_over_ranks(row_fn(rows)), s.perturber, seeds, eps, early)
    return lp, lm, (g if lazy else g.tolist())


# ---- checkpoints -------------------------------------------------------------------------------


def save_trained(s: Session, folder: str) -> None:
    """The trained parameters: a PEFT adapter (LoRA) or trained.safetensors (full mode)."""
    os.makedirs(folder, exist_ok=True)
    if s.loras is not None:
        save_peft(s.loras, folder, peft_base(s.source, s.folder), s.target_names, s.lora_args)
    else:
        tensors = {n: t.detach().cpu().contiguous() for n, t in zip(s.trainable.names, s.trainable.tensors)}  # as trained
        save_file(tensors, os.path.join(folder, "trained.safetensors"))


def save_checkpoint(s: Session, path: str, state: dict) -> None:
    """Atomically replace `path` with the trained parameters and `state` (write aside, then rename)."""
    for t in s.trainable.tensors:
        if not torch.isfinite(t).all():
            raise ZoftError(f"refusing to save non-finite parameters to {path}; the last good checkpoint is kept")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_trained(s, tmp)
    # checksums of what was just written: a checkpoint damaged later is refused on load, not resumed from
    state = state | {"sha256": {name: sha256(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    old = path + ".old"
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(path: str) -> None:
    """A kill between save_checkpoint's two renames leaves only `path`.old: put it back (the step log
    replays whatever came after it)."""
    old = path + ".old"
    if not os.path.isdir(path) and os.path.isdir(old):
        os.replace(old, path)


def load_checkpoint(s: Session, path: str, need: tuple[str, ...] = ()) -> dict:
    """Load a checkpoint's parameters; returns its state. A damaged checkpoint (state.json missing, malformed,
    lacking a key in `need`, or a file whose checksum differs) is a ZoftError: resuming from it would be wrong."""
    fix = (f"the checkpoint is damaged; zoft replay --model MODEL --log {os.path.join(os.path.dirname(path), 'steps.jsonl')} "
           "--output-dir NEW_FOLDER rebuilds the trained parameters from the step log")
    state = read_json(os.path.join(path, "state.json"), "checkpoint state", fix)
    for k in need:
        if not (isinstance(state.get(k), int) and state[k] >= 0):
            raise ZoftError(f"checkpoint state {path}/state.json has no valid {k!r} ({state.get(k)!r}); {fix}")
    for name, digest in state.get("sha256", {}).items():
        f = os.path.join(path, name)
        if not os.path.isfile(f) or sha256(f) != digest:
            raise ZoftError(f"{f} is {'missing' if not os.path.isfile(f) else 'not the file that was saved (checksum)'}; {fix}")
    if s.loras is not None:
        load_peft_weights(s.loras, path)
    else:
        tensors = load_tensors(os.path.join(path, "trained.safetensors"), fix)
        with torch.no_grad():
            for n, t in zip(s.trainable.names, s.trainable.tensors):
                if n not in tensors or tensors[n].shape != t.shape:
                    raise ZoftError(f"{path}/trained.safetensors lacks {n} or has another shape; {fix}")
                t.copy_(tensors[n])
    return state


# ---- the loop ----------------------------------------------------------------------------------


class _Signals:
    """Turn SIGINT/SIGTERM into a flag checked between steps, so a step is never cut in half."""

    def __init__(self):
        self.got: int | None = None
        self.old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.got = signum

    def __exit__(self, *exc):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def snapshot(s: Session) -> torch.Tensor | None:
    """LoRA parameters are small: keep a flat copy before each update so the guard can undo it exactly."""
    if s.loras is None:
        return None
    return s.trainable.flat_values(copy=True)


class HostCopy:
    """A small device tensor on its way to the host: the copy starts now (pinned, asynchronous on CUDA),
    and read() waits for that copy alone, not for work queued after it."""

    def __init__(self, t: torch.Tensor):
        self.event = None
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            t = host
        self.host = t

    def read(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


def train(cfg: TrainConfig, data: Task | None = None, callbacks: Sequence[Callback] = ()) -> dict:
    """Train as `cfg` says; `data`: a task already in hand (the Python API) instead of cfg.task's source;
    `callbacks` see every metrics row (zoft.tracking.Callback)."""
    rc, zc = cfg.run, cfg.zo
    check_output_dir(rc.output_dir)  # a file, under a file, read-only: before loading anything
    prepared = prepare_data(cfg, model_chat(cfg.model), data)  # before the model: bad data fails in a second
    tracking.check(rc.report_to)
    if zc.optimizer == "adamw":
        from zoft.backprop import train_backprop

        return train_backprop(cfg, prepared, callbacks)
    rank, world = dist.world()
    main = rank == 0
    out = rc.output_dir
    ckpt = os.path.join(out, "checkpoint")
    if rc.resume:
        recover_checkpoint(ckpt)
    if os.path.isdir(ckpt) and not rc.resume:
        raise ZoftError(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --output-dir")
    if rc.resume and not os.path.isdir(ckpt):
        raise ZoftError(f"--resume: no checkpoint in {out}; run without --resume to start")
    if zc.batch_size < world:
        raise ZoftError(f"--batch-size {zc.batch_size} is smaller than the {world} ranks; each needs an example")
    t_start = time.time()
    say = log if main else (lambda msg: None)

    cfg.model.device = dist.local_device(cfg.model.device)
    s = load_session(cfg.model)
    check_lora_targets(s, zc)
    attach(s, zc, rc.seed)
    os.makedirs(out, exist_ok=True)  # only once the model loaded: a failed start leaves no empty run folder
    engine = make_engine(s, rc.cache_mb, rc.pack_tokens, rc.cuda_graphs)
    eps, base_lr = zc.eps_value, zc.lr_value
    resolved = cfg.to_dict() | {"resolved": {"eps": eps, "lr": base_lr, "path": s.path, "device": s.device,
                                             "base": peft_base(s.source, s.folder),
                                             "trainable_parameters": s.trainable.n_trained(), "layers": s.layers,
                                             "world_size": world, "z_backend": s.trainable.z_backend,
                                             "full_step": s.full_step if zc.mode == "full" else None}}
    if main:
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(resolved, f, indent=2)
    say(describe(s, engine) + (f"; data parallel over {world} ranks" if world > 1 else ""))
    say(f"zoft: training {s.trainable.n_trained():,} parameters ({zc.mode}{', A frozen' if s.trainable.fixed else ''}), "
        f"ε={eps:g}, lr={base_lr:g}")

    enc, splits, loss = load_data(cfg, s, prepared)
    say(f"zoft: task {prepared[0].name}: {len(enc['train'])} train / {len(enc['dev'])} dev / {len(enc['test'])} test, loss={loss}")

    log_path = os.path.join(out, "steps.jsonl")
    step, best_dev, zero_shot, lr_scale, applied = 0, -1.0, None, 1.0, 0
    if rc.resume:
        state = load_checkpoint(s, ckpt, need=("next_step", "applied"))
        best_dev, zero_shot = state.get("best_dev", -1.0), state.get("zero_shot_accuracy")
        lr_scale = state.get("lr_scale", 1.0)
        _, records = steplog.read(log_path) if os.path.exists(log_path) else (None, [])
        held = steplog.effective(records)  # the updates the parameters should hold
        if state["applied"] > len(held):
            raise ZoftError(f"{ckpt} is ahead of a divergence-guard revert in {log_path} (killed between the two); "
                            f"rebuild the parameters with: zoft replay --model {cfg.model.model} --log {log_path}")
        todo, applied = held[state["applied"] :], len(held)
        for r in todo:  # logged after the checkpoint: redo their arithmetic, no forwards needed
            steplog.apply(s.trainable, r, s.full_step if zc.mode == "full" else "rows", eps, zc.weight_decay)
        lr_scale = min([lr_scale] + [r.get("lr_scale", 1.0) for r in records if "revert_to" in r])
        step = max(state["next_step"], steplog.next_step(records))
        say(f"zoft: resumed from {ckpt} (step {state['next_step']}), replayed {len(todo)} logged steps; next step {step}")
    elif rc.zero_shot and enc["test"] and main:
        zero_shot = evaluate_split(engine, s, enc["test"], splits["test"], rc.eval_batch_size, desc="zero-shot eval")["score"]
        say(f"zoft: zero-shot test accuracy {zero_shot:.4f}")
    slog = steplog.StepLog(log_path, resolved, rc.fsync_every, fresh=not rc.resume) if main else None

    def state(next_step: int) -> dict:
        return {"next_step": next_step, "applied": applied, "best_dev": best_dev, "zero_shot_accuracy": zero_shot,
                "lr_scale": lr_scale}

    if main and not rc.resume:
        save_checkpoint(s, ckpt, state(0))  # the starting point: what the guard falls back to in full mode
    metrics = open(os.path.join(out, "metrics.jsonl"), "a" if rc.resume else "w") if main else None
    reporters = tracking.Reporters(rc.report_to, out, resolved, callbacks) if main else None

    def emit(row: dict) -> None:  # one metrics row: metrics.jsonl, then the trackers and callbacks
        metrics.write(json.dumps(row) + "\n")
        reporters.log(row)
    bar = progress(total=rc.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not main)
    # Pipelined steps (LoRA with the candidate or LM loss, all on the device): step i's update is queued
    # with g still on the device, and the host reads step i's losses while step i+1 runs, so nothing
    # waits for the GPU between steps. A non-finite g makes the queued update a no-op; a rejected step
    # (non-finite or a guard spike) restores the copy taken before the last accepted update and runs
    # again from the step after the rejected one: the same parameters as the synchronous loop, which
    # checks before it updates. Every boundary (eval, save, log, signals, the end) first reads every
    # queued step, so what is evaluated and saved is exactly the accepted updates.
    lazy = rc.pipeline and s.loras is not None and loss != "f1" and not zc.spread_directions
    ema, t_loop, recent, strikes, first, undo = None, time.time(), [], 0, step, None
    train_set, ahead = enc["train"], {}  # ahead["packed"]: this step's batch, packed during the previous step
    inflight: list[dict] = []  # lazy: steps whose update is queued and whose losses the host has not read
    signalled = 0  # data parallel: a signal some rank got, learnt through the step's all-reduce
    t_prev = t_flush = time.time()

    def my_examples(at: int) -> list[int]:  # this rank's examples at step `at` (all of them when spreading directions)
        idx = batch_indices(at, min(zc.batch_size, len(train_set)), len(train_set), rc.seed)
        return idx if zc.spread_directions else dist.shard(idx, rank, world)

    def boundary(at: int) -> bool:  # after `at` steps: work that needs the parameters as accepted so far
        every = lambda k: k and at % k == 0
        return at >= rc.steps or every(rc.eval_every) or every(rc.save_every) or (world == 1 and bool(sig.got))

    def reject(r: dict, why: str) -> None:
        """Step r is rejected: undo the update before it, lower the lr, and go on from the step after r."""
        nonlocal applied, undo, lr_scale, strikes, step
        strikes += 1
        nothing_to_undo = applied == 0
        if applied > 0:  # the update before this loss is the suspect: undo it exactly
            applied, undo = _undo_last(s, ckpt, undo, applied), None
            dist.barrier()  # every rank has read the checkpoint before rank 0 replaces it below
            lr_scale *= rc.guard_lr_factor
            if main:
                slog.write({"step": r["step"], "revert_to": applied, "reason": why, "lr_scale": lr_scale})
                save_checkpoint(s, ckpt, state(r["step"] + 1))
        if strikes > rc.guard_strikes or nothing_to_undo:
            if main:
                slog.close()
            bar.close()
            raise ZoftError(f"{why} at step {r['step'] + 1} ({strikes} strike(s)); the parameters before it are in "
                            f"{ckpt}: lower --lr or --eps and continue with --resume")
        if main:
            bar.write(file=sys.stderr, s=f"step {r['step'] + 1}: {why}; undid the last update, lr × {rc.guard_lr_factor} "
                      f"(strike {strikes}/{rc.guard_strikes})")
        inflight.clear()  # queued after r: computed on parameters that no longer hold
        ahead.clear()  # the batch packed ahead is for the step after the last one queued
        step = r["step"] + 1
        bar.n = step
        bar.refresh()

    def accept(r: dict) -> bool:
        """Read step r's losses; log and count it, or reject it. (Synchronous steps update here.)"""
        nonlocal applied, undo, ema, t_prev, t_flush, signalled
        vals = r["vals"].read() if isinstance(r["vals"], HostCopy) else r["vals"]
        n = len(r["seeds"])
        if world > 1 and vals[-1] > 0:  # some rank was signalled during this step: every rank stops together
            signalled = int(vals[-1])
        lp, lm, grads = vals[:n], vals[n : 2 * n], vals[2 * n : 3 * n]
        loss_val = sum(a + b for a, b in zip(lp, lm)) / (2 * n)
        finite = all(math.isfinite(x) for x in grads + [loss_val])
        spike = (rc.guard_threshold > 0 and len(recent) >= 20
                 and loss_val > rc.guard_threshold * statistics.median(recent[-100:]))
        if not finite or spike:
            reject(r, "non-finite loss" if not finite else f"loss {loss_val:.4g} > {rc.guard_threshold}× running median")
            return False
        if main:  # synchronous: written ahead of the update. Pipelined: the update is already queued, but no
            # checkpoint is written before a flush has logged every queued step, so a crash loses both together
            slog.write({"step": r["step"], "seeds": r["seeds"], "grads": grads, "lr": r["lr"], "loss": loss_val})
        if "snap" in r:  # lazy: already queued
            undo = r["snap"]
        else:
            undo = snapshot(s)
            sgd_update_(s.trainable, r["seeds"], grads, r["lr"], zc.weight_decay)
        applied += 1
        recent.append(loss_val)
        now = time.time()
        dt, t_prev = r["t"] - t_prev, r["t"]  # between queueing this step and the one before
        ema = loss_val if ema is None else 0.95 * ema + 0.05 * loss_val
        g_mean = sum(grads) / len(grads)
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.4f}", g=f"{g_mean:+.3g}", s_step=f"{dt:.3f}", refresh=False)  # shown at the next refresh
        if main:
            emit({"step": r["step"] + 1, "loss": loss_val, "projected_grad": g_mean, "lr": r["lr"],
                  "forwards": 2 * n * (r["step"] + 1),  # two perturbed passes per direction, every step so far
                  "seconds": round(now - t_start, 3), "step_seconds": round(dt, 4)})
            if now - t_flush > 2:  # readable while the run goes on, without a write call per step
                metrics.flush()
                t_flush = now
        return True

    with _Signals() as sig:
        while step < rc.steps:
            lr = lr_at(step, rc.steps, base_lr, zc.schedule, zc.warmup) * lr_scale
            if zc.spread_directions:  # the whole batch here; this rank's share of the directions
                all_seeds = direction_seeds(rc.seed, step, zc.directions * world)
                seeds = all_seeds[rank::world]
            else:  # this rank's share of the batch; every direction
                seeds = direction_seeds(rc.seed, step, zc.directions)
            mine = my_examples(step)
            batch = [train_set[i] for i in mine]
            golds = [answers_of(splits["train"][i]) for i in mine] if loss == "f1" else None
            lp, lm, grads = step_losses(
                engine, s, batch, loss, seeds, eps, golds, reduce=not zc.spread_directions,
                packed=ahead.pop("packed", None), ahead=ahead, lazy=lazy,
                next_batch=[train_set[i] for i in my_examples(step + 1)] if step + 1 < rc.steps else None)
            if zc.spread_directions and world > 1:  # (L₊, L₋, g) of every direction, back in seed order
                parts = dist.all_gather_floats(lp.tolist() + lm.tolist() + grads)
                n = zc.directions
                order = sorted(((k * world + r, p[i], p[n + i], p[2 * n + i]) for r, p in enumerate(parts)
                                for k, i in enumerate(range(n))))
                seeds = all_seeds
                lp, lm = torch.tensor([o[1] for o in order]), torch.tensor([o[2] for o in order])
                grads = [o[3] for o in order]
            if zc.clip_grad:  # the clipped g is what the update uses and the step log records
                c = zc.clip_grad
                grads = (torch.where(grads.isfinite(), grads.clamp(-c, c), grads) if torch.is_tensor(grads)
                         else [min(max(x, -c), c) if math.isfinite(x) else x for x in grads])  # ±inf and NaN stay
            rec = {"step": step, "seeds": seeds, "lr": lr, "t": time.time()}
            flag = []
            if world > 1:  # the ranks agree on stopping through a max over ranks queued with the step
                flag = [dist.all_reduce_max(torch.full((1,), float(sig.got or 0), dtype=torch.float64, device=lp.device))]
            if lazy:
                rec["snap"] = snapshot(s)
                sgd_update_(s.trainable, seeds, grads, lr, zc.weight_decay)  # no-op on the device if g is not finite
                rec["vals"] = HostCopy(torch.cat([lp, lm, grads, *flag]))
            else:
                rec["vals"] = lp.tolist() + lm.tolist() + list(grads) + [float(f) for f in flag]
            inflight.append(rec)
            step += 1
            if main and rc.log_every and step % rc.log_every == 0:  # host-side counts: no need to wait for the GPU
                st = engine.stats.summary()
                bar.write(file=sys.stderr, s=f"step {step}: token×layer work {st['token_layers_computed']:,} computed vs "
                          f"{st['token_layers_naive']:,} naive two-pass ({st['work_saved']:.1%} saved)"
                          + (f", prefix-cache hits {st['prefix_cache_hit_rate']:.1%}" if st["prefix_cache_hit_rate"] else ""))
            flush = boundary(step)
            rejected = False
            while inflight and (flush or signalled or len(inflight) > 1 or not lazy) and not rejected:
                rejected = not accept(inflight.pop(0))
            if inflight or rejected or not (flush or signalled):
                continue  # steps still queued, or a step was rejected: no boundary work now
            if main:
                metrics.flush()
            if main and rc.eval_every and step % rc.eval_every == 0 and enc["dev"]:
                ev = evaluate_split(engine, s, enc["dev"], splits["dev"], rc.eval_batch_size)
                dev, metric = ev["score"], ev["metric"]
                emit({"step": step, f"dev_{metric}": dev, **s.trainable.norms()})
                bar.write(file=sys.stderr, s=f"step {step}: dev {metric} {dev:.4f}" + (" (best)" if dev > best_dev else ""))
                if dev > best_dev:
                    best_dev = dev
                    save_checkpoint(s, os.path.join(out, "best"), {"step": step, "dev_score": dev})
            if main and ((rc.save_every and step % rc.save_every == 0) or step == rc.steps):
                slog.sync()
                save_checkpoint(s, ckpt, state(step))
            got = (sig.got or 0) if world == 1 else signalled  # ranks must stop at the same step, or the others
            if got:  # wait forever in the next all-reduce
                if main:
                    slog.sync()
                    save_checkpoint(s, ckpt, state(step))
                    slog.close()
                    metrics.close()
                    reporters.close()
                dist.barrier()  # no rank exits before the checkpoint is written (torchrun would kill rank 0)
                name = signal.Signals(got).name
                bar.close()
                raise Interrupted(f"{name} at step {step}: checkpoint saved in {ckpt}; resume with the same "
                                  f"command plus --resume", 128 + got)
    bar.close()
    if main and rc.resume and first >= rc.steps:  # every step came from the log (the last save failed or was
        slog.sync()  # killed): the loop never ran, so write the final checkpoint it would have written
        save_checkpoint(s, ckpt, state(step))
    train_seconds = time.time() - t_loop
    if not main:
        dist.barrier()
        return {}
    metrics.close()
    reporters.close()
    slog.close()

    result = finish(s, engine, enc, splits, out, rc.eval_batch_size, best_dev)
    result |= {"zero_shot_accuracy": zero_shot, "steps": rc.steps, "seconds": round(time.time() - t_start, 1),
               "train_seconds": round(train_seconds, 1),
               "seconds_per_step": round(train_seconds / max(1, rc.steps - first), 4),
               "path": s.path, "world_size": world, "output_dir": out, **engine.stats.summary(),
               **peak_memory(s.device)}
    if s.loras is not None:
        write_model_card(os.path.join(out, "adapter"), cfg, peft_base(s.source, s.folder), prepared[0].name, result)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    dist.barrier()
    return result


def finish(s: Session, engine, enc: dict, splits: dict, out: str, eval_batch_size: int, best_dev: float) -> dict:
    """After training: the best dev checkpoint (if any) on the test set, predictions and the adapter."""
    if best_dev >= 0:
        load_checkpoint(s, os.path.join(out, "best"))
    result = {"best_dev_accuracy": best_dev if best_dev >= 0 else None}
    if enc["test"]:
        ev = evaluate_split(engine, s, enc["test"], splits["test"], eval_batch_size, desc="test eval")
        write_predictions(os.path.join(out, "test_predictions.jsonl"), ev["rows"])
        result |= {"final_accuracy": ev["score"], "metric": ev["metric"]}
        if ev["metric"] == "f1":
            result |= {"final_f1": ev["f1"], "final_em": ev["em"]}
    if s.loras is not None:
        save_peft(s.loras, os.path.join(out, "adapter"), peft_base(s.source, s.folder), s.target_names, s.lora_args)
    return result


def _undo_last(s: Session, ckpt: str, prev: torch.Tensor | None, applied: int) -> int:
    """Undo exactly: LoRA restores the copy taken before the last update; otherwise reload the checkpoint."""
    if prev is not None:
        with torch.no_grad():
            parts = prev.split([t.numel() for t in s.trainable.tensors])
            torch._foreach_copy_([t.data for t in s.trainable.tensors],
                                 [p.view_as(t).to(t.dtype) for p, t in zip(parts, s.trainable.tensors)])
        return applied - 1
    return load_checkpoint(s, ckpt)["applied"]


def replay(model: str, log_path: str, output_dir: str, device: str = "") -> dict:
    """Rebuild a run's trained parameters from the base weights and its step log alone."""
    if not os.path.isfile(log_path):
        raise ZoftError(f"step log {log_path} does not exist")
    header, records = steplog.read(log_path)
    if header is None:
        raise ZoftError(f"{log_path} has no header line; is it a zoft steps.jsonl?")
    resolved = header.pop("resolved", {})
    cfg = TrainConfig.from_dict(header)
    cfg.model.model = model
    cfg.model.device = device or resolved.get("device", "cpu").split(":")[0]
    s = load_session(cfg.model)
    attach(s, cfg.zo, cfg.run.seed)
    todo = steplog.effective(records)
    for r in tqdm(todo, desc="replay", unit="step", disable=not sys.stderr.isatty()):
        steplog.apply(s.trainable, r, s.full_step if cfg.zo.mode == "full" else "rows", cfg.zo.eps_value,
                      cfg.zo.weight_decay)
    save_trained(s, output_dir)
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(header | {"resolved": resolved}, f, indent=2)
    return {"steps_replayed": len(todo), "output_dir": output_dir}
