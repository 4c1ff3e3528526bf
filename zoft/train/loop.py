"""The training loop, written out: sample a batch, estimate g, update, log, evaluate, checkpoint.

Every step is a pure function of (parameters, step index, run seed): the batch comes from a
per-epoch permutation seeded by (seed, epoch), the directions from (seed, step). That is what makes
--resume exact: restoring the parameters and the step index restores the run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence

import torch

from zoft import distributed as dist
from zoft import tracking
from zoft.card import write_model_card
from zoft.config import TrainConfig
from zoft.errors import Interrupted, ZoftError
from zoft.evaluate import answers_of, evaluate_split
from zoft.session import (
    attach,
    check_lora_targets,
    describe,
    load_session,
    log,
    make_engine,
    peft_base,
    progress,
)
from zoft.tasks import Task
from zoft.tracking import Callback
from zoft.train import rundir, steplog
from zoft.train.backprop import peak_memory
from zoft.train.checkpoint import (
    finish,
    load_checkpoint,
    load_undo,
    open_metrics,
    recover_checkpoint,
    save_checkpoint,
    undo_last,
)
from zoft.train.data import batch_indices, load_data, metric_of, model_chat, write_splits
from zoft.train.pipeline import HostCopy, snapshot
from zoft.train.resume import Plan, check_loaded, model_fingerprint, prepare
from zoft.train.step import step_losses
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import lr_at, sgd_update_


def guard_stop(why: str, step: int, strikes: int, ckpt: str) -> str:
    return (f"{why} at step {step + 1} ({strikes} strike(s)); the parameters before it are in {ckpt}: continue "
            "with --resume and a lower --lr (every other flag as it was)")


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


def train(cfg: TrainConfig, data: Task | None = None, callbacks: Sequence[Callback] = ()) -> dict:
    """Check the output folder, the data (and, on --resume, the run) before writing anything, take the
    folder's lock once every check passed (the model's too), then train with MeZO (or the adamw baseline).
    `data`: a task already in hand (the Python API) instead of cfg.task's source; `callbacks` see every
    metrics row (zoft.tracking)."""
    plan = prepare(cfg, model_chat(cfg.model), data)  # before the model: bad data fails in a second
    tracking.check(cfg.run.report_to)
    out, held = cfg.run.output_dir, []

    def claim() -> None:
        """Rank 0 takes the run folder: its lock (so a refused run leaves even a stale lock as it was), then
        an --overwrite-output-dir clears zoft's old files."""
        if dist.world()[0] != 0:
            return
        lock = rundir.RunLock(out).acquire()
        held.append(lock)
        if lock.stale:
            log(f"zoft: took over the lock of pid {lock.stale.get('pid')} on {lock.stale.get('host')} in {out}: "
                "that process ended without releasing it")
        if plan.how == "overwrite" and (gone := rundir.clear_run(out)):
            log(f"zoft: replacing the zoft run in {out} (removed {', '.join(gone)})")

    try:
        if cfg.zo.optimizer == "adamw":
            from zoft.train.backprop import train_backprop

            claim()
            return train_backprop(cfg, plan, callbacks)
        return _train(cfg, plan, claim, callbacks)
    finally:
        for lock in held:
            lock.release()


def _train(cfg: TrainConfig, plan: Plan, claim, callbacks: Sequence[Callback] = ()) -> dict:
    rc, zc = cfg.run, cfg.zo
    rank, world = dist.world()
    main = rank == 0
    out = rc.output_dir
    ckpt = os.path.join(out, "checkpoint")
    if zc.batch_size < world:
        raise ZoftError(f"--batch-size {zc.batch_size} is smaller than the {world} ranks; each needs an example")
    t_start = time.time()
    say = log if main else (lambda msg: None)

    cfg.model.device = dist.local_device(cfg.model.device)
    s = load_session(cfg.model)
    check_lora_targets(s, zc)
    fingerprint = model_fingerprint(s.model)  # before LoRA changes the module tree
    attach(s, zc, rc.seed)
    engine = make_engine(s, rc.cache_mb, rc.pack_tokens, rc.cuda_graphs)
    eps, base_lr = zc.eps_value, zc.lr_value
    resolved = cfg.to_dict() | {"resolved": {"eps": eps, "lr": base_lr, "path": s.path, "device": s.device,
                                             "base": peft_base(s.source, s.folder),
                                             "trainable_parameters": s.trainable.n_trained(), "layers": s.layers,
                                             "world_size": world, "z_backend": s.trainable.z_backend,
                                             "full_step": s.full_step if zc.mode == "full" else None,
                                             "model_fingerprint": fingerprint}}
    if plan.saved is not None:
        check_loaded(plan.saved, resolved, out)
    claim()
    if main:  # every check passed: from here on the run folder is written, each file whole or not at all
        for name in ("checkpoint", "best", "adapter"):
            recover_checkpoint(os.path.join(out, name))
        rundir.write_json(os.path.join(out, rundir.CONFIG), resolved)
        if plan.how != "resume" or not os.path.isfile(os.path.join(out, rundir.SPLITS)):
            write_splits(out, cfg, plan)
    say(describe(s, engine) + (f"; data parallel over {world} ranks" if world > 1 else ""))
    say(f"zoft: training {s.trainable.n_trained():,} parameters ({zc.mode}{', A frozen' if s.trainable.fixed else ''}), "
        f"ε={eps:g}, lr={base_lr:g}")

    enc, splits, loss = load_data(cfg, s, plan)
    say(f"zoft: task {plan.task.name}: {len(enc['train'])} train / {len(enc['dev'])} dev / {len(enc['test'])} test, loss={loss}")

    log_path = os.path.join(out, "steps.jsonl")
    step, best_dev, zero_shot, lr_scale, applied = 0, -1.0, None, 1.0, 0
    recent, strikes, undo, post = [], 0, None, []  # the guard's window and strikes; the copy it restores
    metric = metric_of(splits)
    if rc.resume and plan.state is not None:
        st = load_checkpoint(s, ckpt, need=("next_step", "applied"), verify=False)  # prepare() checked it
        step, applied, best_dev, zero_shot = st["next_step"], st["applied"], st.get("best_dev", -1.0), st.get("zero_shot")
        zero_shot = st.get("zero_shot_accuracy") if zero_shot is None else zero_shot  # older checkpoints
        lr_scale, guard = st.get("lr_scale", 1.0), st.get("guard", {})
        recent, strikes = list(guard.get("recent", [])), 0 if st.get("stopped") else guard.get("strikes", 0)
        undo = load_undo(s, ckpt)
    if rc.resume:
        post = plan.logged
        say(f"zoft: resumed from {ckpt if plan.state is not None else 'the base weights'} (step {step}); "
            f"replaying {len(post)} logged records")
    if (not rc.resume or plan.state is None) and rc.zero_shot and enc["test"] and main:
        zero_shot = evaluate_split(engine, s, enc["test"], splits["test"], rc.eval_batch_size, desc="zero-shot eval")["score"]
        say(f"zoft: zero-shot test {metric} {zero_shot:.4f}")
    slog = steplog.StepLog(log_path, resolved, rc.fsync_every, fresh=not rc.resume) if main else None

    def state(next_step: int) -> dict:
        return {"next_step": next_step, "applied": applied, "best_dev": best_dev, "zero_shot": zero_shot,
                "metric": metric, "lr_scale": lr_scale, "guard": {"recent": recent[-100:], "strikes": strikes}}

    if main and plan.state is None:
        save_checkpoint(s, ckpt, state(0))  # the starting point: what the guard falls back to in full mode
    metrics = open_metrics(os.path.join(out, "metrics.jsonl"), step if rc.resume else None) if main else None
    reporters = tracking.Reporters(rc.report_to, out, resolved, callbacks) if main else None

    def emit(row: dict) -> None:  # one metrics row: metrics.jsonl, then the trackers and callbacks
        metrics.write(json.dumps(row) + "\n")
        reporters.log(row)
    # Pipelined steps (LoRA with the candidate or LM loss, all on the device): step i's update is queued
    # with g still on the device, and the host reads step i's losses while step i+1 runs, so nothing
    # waits for the GPU between steps. A non-finite g makes the queued update a no-op; a rejected step
    # (non-finite or a guard spike) restores the copy taken before the last accepted update and runs
    # again from the step after the rejected one: the same parameters as the synchronous loop, which
    # checks before it updates. Every boundary (eval, save, log, signals, the end) first reads every
    # queued step, so what is evaluated and saved is exactly the accepted updates.
    lazy = rc.pipeline and s.loras is not None and loss != "f1" and not zc.spread_directions
    ema, t_loop = None, time.time()
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
        undoing = applied > 0
        stop = strikes > rc.guard_strikes or not undoing
        if undoing:  # the update before this loss is the suspect: undo it exactly
            applied, undo = undo_last(s, ckpt, undo, applied), None
            dist.barrier()  # every rank has read the checkpoint before rank 0 replaces it below
            lr_scale *= rc.guard_lr_factor
            if main:
                slog.write({"step": r["step"], "revert_to": applied, "reason": why, "lr_scale": lr_scale})
        if main and (undoing or stop):  # a stop is marked: its --resume may lower --lr, with fresh strikes
            metrics.flush()  # a checkpoint never runs ahead of the metrics rows it covers
            save_checkpoint(s, ckpt, state(r["step"] + 1) | ({"stopped": "guard"} if stop else {}), undo)
        if stop:
            if main:
                slog.close()
            bar.close()
            raise ZoftError(guard_stop(why, r["step"], strikes, ckpt))
        if main:
            bar.write(file=sys.stderr, s=f"step {r['step'] + 1}: {why}; undid the last update, lr × {rc.guard_lr_factor} "
                      f"(strike {strikes}/{rc.guard_strikes})")
        inflight.clear()  # queued after r: computed on parameters that no longer hold
        ahead.clear()  # the batch packed ahead is for the step after the last one queued
        step = r["step"] + 1
        bar.n = step
        bar.refresh()

    def checkpoints(at: int) -> None:
        """After `at` accepted steps: the dev evaluation and the checkpoint that are due then."""
        nonlocal best_dev
        if not main:
            return
        metrics.flush()
        if rc.eval_every and at % rc.eval_every == 0 and enc["dev"]:
            ev = evaluate_split(engine, s, enc["dev"], splits["dev"], rc.eval_batch_size)
            dev = ev["score"]
            emit({"step": at, f"dev_{ev['metric']}": dev, **s.trainable.norms()})
            bar.write(file=sys.stderr, s=f"step {at}: dev {ev['metric']} {dev:.4f}" + (" (best)" if dev > best_dev else ""))
            if dev > best_dev:
                best_dev = dev
                save_checkpoint(s, os.path.join(out, "best"), {"step": at, "dev_score": dev})
        if (rc.save_every and at % rc.save_every == 0) or at == rc.steps:
            metrics.flush()  # a checkpoint never runs ahead of the metrics rows it covers
            slog.sync()
            save_checkpoint(s, ckpt, state(at), undo)

    def catch_up(records: list[dict]) -> None:
        """--resume: redo the steps logged after the checkpoint as the run did them, without their forwards:
        the updates and guard reverts, the metrics rows, and the dev evaluations and checkpoints due."""
        nonlocal applied, undo, strikes, lr_scale, step
        for r in records:
            step = r["step"] + 1
            if "revert_to" in r:  # logged by reject(), which then saved a checkpoint
                applied, undo = undo_last(s, ckpt, undo, applied), None
                dist.barrier()
                strikes, lr_scale = strikes + 1, r["lr_scale"]
                stop = strikes > rc.guard_strikes
                if main:
                    metrics.flush()
                    save_checkpoint(s, ckpt, state(step) | ({"stopped": "guard"} if stop else {}), undo)
                if stop:
                    raise ZoftError(guard_stop(r["reason"], r["step"], strikes, ckpt))
                continue
            undo = snapshot(s)
            steplog.apply(s.trainable, r, s.full_step if zc.mode == "full" else "rows", eps, zc.weight_decay)
            applied += 1
            recent.append(r["loss"])
            if main:  # the row the run wrote for this step, again (its seconds are this process's)
                emit({"step": step, "loss": r["loss"], "projected_grad": sum(r["grads"]) / len(r["grads"]), "lr": r["lr"],
                      "forwards": 2 * len(r["seeds"]) * step, "seconds": round(time.time() - t_start, 3),
                      "replayed": True})
            checkpoints(step)

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

    bar = progress(total=rc.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, disable=not main)
    catch_up(post)
    bar.n = first = step
    t_loop = time.time()
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
            checkpoints(step)
            got = (sig.got or 0) if world == 1 else signalled  # ranks must stop at the same step, or the others
            if got:  # wait forever in the next all-reduce
                if main:
                    metrics.flush()
                    slog.sync()
                    save_checkpoint(s, ckpt, state(step), undo)
                    slog.close()
                    metrics.close()
                    reporters.close()
                dist.barrier()  # no rank exits before the checkpoint is written (torchrun would kill rank 0)
                name = signal.Signals(got).name
                bar.close()
                raise Interrupted(f"{name} at step {step}: checkpoint saved in {ckpt}; resume with the same "
                                  f"command plus --resume", 128 + got)
    bar.close()
    train_seconds = time.time() - t_loop
    if not main:
        dist.barrier()
        return {}
    metrics.close()
    reporters.close()
    slog.close()

    result = finish(s, engine, enc, splits, out, rc.eval_batch_size, best_dev)
    result |= {f"zero_shot_{metric}": zero_shot, "steps": rc.steps, "seconds": round(time.time() - t_start, 1),
               "train_seconds": round(train_seconds, 1),
               "seconds_per_step": round(train_seconds / max(1, rc.steps - first), 4),
               "path": s.path, "world_size": world, "output_dir": out, **engine.stats.summary(),
               **peak_memory(s.device)}
    if s.loras is not None:
        write_model_card(os.path.join(out, "adapter"), cfg, peft_base(s.source, s.folder), plan.task.name, result)
    rundir.write_json(os.path.join(out, "results.json"), result)
    dist.barrier()
    return result


