"""The training loop, written out: sample a batch, estimate g, update, log, evaluate, checkpoint.

Every step is a pure function of (parameters, step index, run seed): the batch comes from a
per-epoch permutation seeded by (seed, epoch), the directions from (seed, step). That is what makes
--resume exact: restoring the parameters and the step index restores the run. The parts live beside
this file: the step (step.py), the guard (guard.py), the pipeline (pipeline.py), checkpoints
(checkpoint.py), the step log (steplog.py). A --optimizer method (zoft.zo.methods) replaces the estimate
and the update: its query's rows in one forward (query_losses), read at once, then update_method_. The
tests patch step_losses, query_losses, sgd_update_, update_method_ and save_checkpoint here: the loop
looks them up in this module.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

import torch

from zoft import distributed as dist
from zoft import tracking
from zoft.card import write_model_card
from zoft.config import TrainConfig
from zoft.errors import Interrupted, ZoftError
from zoft.evaluate import answers_of, evaluate_split, evaluation_row
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
)
from zoft.tasks import Task
from zoft.tracking import Callback
from zoft.train import rundir, steplog
from zoft.train.backprop import peak_memory
from zoft.train.checkpoint import (
    finish,
    keep_numbered,
    load_checkpoint,
    load_undo,
    load_undo_state,
    logged_train_seconds,
    open_metrics,
    recover_checkpoint,
    restore_copy,
    rewind,
    save_checkpoint,
    undo_last,
)
from zoft.train.data import batch_indices, load_data, metric_of, model_chat, write_splits
from zoft.train.guard import Guard
from zoft.train.pipeline import HostCopy, Pipeline, pipelines, snapshot
from zoft.train.resume import Plan, check_loaded, model_fingerprint, prepare
from zoft.train.step import StepResult, clip, gather_directions, query_losses, step_losses
from zoft.zo.methods import update_method_
from zoft.zo.trainable import direction_seeds
from zoft.zo.update import lr_at, sgd_update_


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
        return train_zo(cfg, plan, claim, callbacks)
    finally:
        for lock in held:
            lock.release()


def train_zo(cfg: TrainConfig, plan: Plan, claim: Callable[[], None], callbacks: Sequence[Callback] = ()) -> dict:
    """MeZO: load and check everything, take the folder (claim), then the loop; the results."""
    t_start = time.time()
    s, engine, resolved = open_session(cfg, plan)
    claim()
    start_folder(cfg, plan, resolved)
    run = Run(cfg, plan, s, engine, resolved, t_start, callbacks)
    run.catch_up(plan.logged if cfg.run.resume else [])
    with _Signals() as sig:
        run.loop(sig)
    return run.results()


def open_session(cfg: TrainConfig, plan: Plan) -> tuple[Session, object, dict]:
    """The model with what it trains attached, its engine, and the resolved config (checked against the
    run's own on --resume)."""
    zc, world = cfg.zo, dist.world()[1]
    if zc.batch_size < world:
        raise ZoftError(f"--batch-size {zc.batch_size} is smaller than the {world} ranks; each needs an example")
    cfg.model.device = dist.local_device(cfg.model.device)
    s = load_session(cfg.model)
    check_lora_targets(s, zc)
    fingerprint = model_fingerprint(s.model)  # before LoRA changes the module tree
    attach(s, zc, cfg.run.seed)
    engine = make_engine(s, cfg.run.cache_mb, cfg.run.pack_tokens, cfg.run.cuda_graphs)
    resolved = cfg.to_dict() | {"resolved": {"eps": zc.eps_value, "lr": zc.lr_value, "path": s.path, "device": s.device,
                                             "base": peft_base(s.source, s.folder),
                                             "trainable_parameters": s.trainable.n_trained(), "layers": s.layers,
                                             "world_size": world, "z_backend": s.trainable.z_backend,
                                             "full_step": s.full_step if zc.mode == "full" else None,
                                             "model_fingerprint": fingerprint}}
    if plan.saved is not None:
        check_loaded(plan.saved, resolved, cfg.run.output_dir)
    return s, engine, resolved


def start_folder(cfg: TrainConfig, plan: Plan, resolved: dict) -> None:
    """Every check passed: from here on rank 0 writes the run folder, each file whole or not at all."""
    out = cfg.run.output_dir
    if dist.world()[0] != 0:
        return
    for name in ("checkpoint", "best", "adapter"):
        recover_checkpoint(os.path.join(out, name))
    rundir.write_json(os.path.join(out, rundir.CONFIG), resolved)
    if plan.how != "resume" or not os.path.isfile(os.path.join(out, rundir.SPLITS)):
        write_splits(out, cfg, plan)


class Run:
    """One MeZO run: its session, data, outputs and counters, shared by the loop's calls. Rank 0 logs,
    evaluates and saves; every rank computes and applies the same updates."""

    def __init__(self, cfg: TrainConfig, plan: Plan, s: Session, engine, resolved: dict, t_start: float,
                 callbacks: Sequence[Callback]):
        self.cfg, self.rc, self.zc, self.plan, self.s, self.engine = cfg, cfg.run, cfg.zo, plan, s, engine
        self.rank, self.world = dist.world()
        self.main, self.t_start = self.rank == 0, t_start
        self.out = self.rc.output_dir
        self.ckpt = os.path.join(self.out, "checkpoint")
        self.say(describe(s, engine) + (f"; data parallel over {self.world} ranks" if self.world > 1 else ""))
        self.say(f"zoft: training {s.trainable.n_trained():,} parameters ({self.zc.mode}"
                 f"{', A frozen' if s.trainable.fixed else ''}), ε={self.zc.eps_value:g}, lr={self.zc.lr_value:g}")
        self.enc, self.splits, self.loss = load_data(cfg, s, plan)
        self.say(f"zoft: task {plan.task.name}: {len(self.enc['train'])} train / {len(self.enc['dev'])} dev / "
                 f"{len(self.enc['test'])} test, loss={self.loss}")
        self.train_set, self.metric = self.enc["train"], metric_of(self.splits)
        self.method = s.method  # None: ZO-SGD (zoft.zo.update)
        self.restore()
        self.open_outputs(resolved, callbacks)
        self.pipe = Pipeline(lazy=self.rc.pipeline and pipelines(s) and self.loss != "f1"
                             and not self.zc.spread_directions)
        self.signalled = 0  # data parallel: a signal some rank got, learnt through the step's all-reduce
        self.ema, self.t_prev, self.t_flush = None, time.time(), time.time()
        self.bar = progress(total=self.rc.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                            disable=not self.main)

    def say(self, msg: str) -> None:
        if self.main:
            log(msg)

    def restore(self) -> None:
        """The counters, the guard and its undo copy: from the checkpoint on --resume, else fresh; the
        zero-shot evaluation of a fresh run."""
        rc, s = self.rc, self.s
        self.step, self.applied, self.best_dev, self.zero_shot, self.undo, st = 0, 0, -1.0, None, None, None
        self.train_before, self.t_loop, self.paused = 0.0, None, 0.0  # train_before: earlier processes' (--resume)
        self.undo_state = None  # a method's state before the last update (beside self.undo, θ's copy)
        if rc.resume and self.plan.state is not None:
            st = load_checkpoint(s, self.ckpt, need=("next_step", "applied"), verify=False)  # prepare() checked it
            self.step, self.applied, self.best_dev = st["next_step"], st["applied"], st.get("best_dev", -1.0)
            self.zero_shot = st.get("zero_shot")
            self.zero_shot = st.get("zero_shot_accuracy") if self.zero_shot is None else self.zero_shot  # older checkpoints
            self.undo, self.undo_state = load_undo(s, self.ckpt), load_undo_state(s, self.ckpt)
        self.guard = Guard(rc.guard_threshold, rc.guard_strikes, rc.guard_lr_factor, st)
        if rc.resume:
            self.say(f"zoft: resumed from {self.ckpt if self.plan.state is not None else 'the base weights'} "
                     f"(step {self.step}); replaying {len(self.plan.logged)} logged records")
        if (not rc.resume or self.plan.state is None) and rc.zero_shot and self.enc["test"] and self.main:
            self.zero_shot = evaluate_split(self.engine, s, self.enc["test"], self.splits["test"], rc.eval_batch_size,
                                            desc="zero-shot eval")["score"]
            self.say(f"zoft: zero-shot test {self.metric} {self.zero_shot:.4f}")

    def open_outputs(self, resolved: dict, callbacks: Sequence[Callback]) -> None:
        """Rank 0: the step log, the starting checkpoint (what the guard falls back to in full mode), the
        metrics rows and the trackers."""
        self.slog = self.metrics = self.reporters = None
        if not self.main:
            return
        rc = self.rc
        self.slog = steplog.StepLog(os.path.join(self.out, "steps.jsonl"), resolved, rc.fsync_every, fresh=not rc.resume)
        if self.plan.state is None:
            save_checkpoint(self.s, self.ckpt, self.state(0))  # (a method's state: as it starts)
        self.metrics = open_metrics(os.path.join(self.out, "metrics.jsonl"), self.step if rc.resume else None)
        if rc.resume:  # the checkpoint stays a pure function of the run: the clock lives in the metrics rows
            self.train_before = logged_train_seconds(os.path.join(self.out, "metrics.jsonl"))
        self.reporters = tracking.Reporters(rc.report_to, self.out, resolved, callbacks)

    def state(self, next_step: int) -> dict:
        """What a checkpoint's state.json holds beside the parameters."""
        return {"next_step": next_step, "applied": self.applied, "best_dev": self.best_dev,
                "zero_shot": self.zero_shot, "metric": self.metric, **self.guard.state()}

    def train_seconds(self) -> float:
        """Seconds spent training so far, over every process of the run: the loop's time without its
        evaluations and checkpoints (model loading and the zero-shot evaluation come before the loop)."""
        if self.t_loop is None:
            return self.train_before
        return self.train_before + time.time() - self.t_loop - self.paused

    def rows(self) -> int:
        """Forward rows a step computes (all ranks' directions with --spread-directions). Every step index runs its
        forward once, a rejected one too (the run goes on from the step after it), so after step i the run has
        computed rows()·(i + 1): metrics.jsonl's "forwards". (The pipeline's speculative next step, which a
        rejection discards and the synchronous loop never runs, is not counted.)"""
        n = self.zc.directions * (self.world if self.zc.spread_directions else 1)
        return 2 * n if self.method is None else self.method.rows(n)

    def emit(self, row: dict) -> None:
        """One metrics row: metrics.jsonl, then the trackers and callbacks."""
        self.metrics.write(json.dumps(row) + "\n")
        self.reporters.log(row)

    # ---- the loop ----------------------------------------------------------------------------------

    def loop(self, sig: _Signals) -> None:
        """sample, estimate, update (queued, or once read), log, then evaluate and checkpoint when due."""
        self.bar.n = self.first = self.step
        self.t_loop, self.paused = time.time(), 0.0
        while self.step < self.rc.steps:
            step, lr = self.step, self.lr(self.step)
            if self.method is not None:
                self.pipe.push(self.query_step(step, lr, sig))
            else:
                seeds, lp, lm, grads = self.estimate(step)
                self.pipe.push(self.update(step, seeds, lr, lp, lm, grads, sig))
            self.step += 1
            self.log_work()
            boundary = self.boundary(sig)
            if self.read_due(boundary) and (boundary or self.signalled):
                self.checkpoints(self.step)
                self.stop_if_signalled(sig)
        self.bar.close()

    def lr(self, step: int) -> float:
        zc = self.zc
        return lr_at(step, self.rc.steps, zc.lr_value, zc.schedule, zc.warmup) * self.guard.lr_scale

    def examples(self, at: int) -> list[int]:
        """This rank's examples at step `at` (all of the batch when the ranks spread the directions instead)."""
        n = len(self.train_set)
        idx = batch_indices(at, min(self.zc.batch_size, n), n, self.rc.seed)
        return idx if self.zc.spread_directions else dist.shard(idx, self.rank, self.world)

    def estimate(self, step: int) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor | list[float]]:
        """Step `step`'s direction seeds, L₊, L₋ and g: this rank's share, gathered when the ranks spread
        the directions, and clipped (the clipped g is what the update uses and the step log records)."""
        zc, rc, world = self.zc, self.rc, self.world
        spread = zc.spread_directions
        all_seeds = direction_seeds(rc.seed, step, zc.directions * (world if spread else 1))
        seeds = all_seeds[self.rank :: world] if spread else all_seeds  # spread: this rank's share of them
        mine = self.examples(step)
        golds = [answers_of(self.splits["train"][i]) for i in mine] if self.loss == "f1" else None
        nxt = [self.train_set[i] for i in self.examples(step + 1)] if step + 1 < rc.steps else None
        lp, lm, grads = step_losses(self.engine, self.s, [self.train_set[i] for i in mine], self.loss, seeds,
                                    zc.eps_value, golds, reduce=not spread, packed=self.pipe.ahead.pop("packed", None),
                                    ahead=self.pipe.ahead, lazy=self.pipe.lazy, next_batch=nxt)
        if spread and world > 1:  # (L₊, L₋, g) of every direction, back in seed order
            (lp, lm, grads), seeds = gather_directions(all_seeds, lp, lm, grads, zc.directions, world), all_seeds
        if zc.clip_grad:
            grads = clip(grads, zc.clip_grad)
        return seeds, lp, lm, grads

    def query_step(self, step: int, lr: float, sig: _Signals) -> StepResult:
        """A --optimizer method's step: its query's rows in one forward. Pipelined, the update is queued with the
        losses still on the device (θ and the state copied first, for the guard); else accept() updates once
        they are read."""
        zc, rc, tr = self.zc, self.rc, self.s.trainable
        seeds = direction_seeds(rc.seed, step, zc.directions)
        q = self.method.query(tr, seeds, step, zc.eps_value)
        mine = self.examples(step)
        golds = [answers_of(self.splits["train"][i]) for i in mine] if self.loss == "f1" else None
        losses = query_losses(self.engine, self.s, [self.train_set[i] for i in mine], self.loss, q, golds,
                              lazy=self.pipe.lazy)
        t, flag = time.time(), dist.stop_flag(sig.got, tr.tensors[0].device)
        if not self.pipe.lazy:
            return StepResult(step, seeds, lr, t, losses + [float(f) for f in flag], query=q)
        snap, snap_state = snapshot(self.s), self.method.state_dict()
        update_method_(self.method, tr, q, losses, lr, zc.weight_decay)
        values = HostCopy(torch.cat([losses, *(f.to(losses.dtype) for f in flag)]))
        return StepResult(step, seeds, lr, t, values, snap, queued=True, query=q, snap_state=snap_state)

    def update(self, step: int, seeds: list[int], lr: float, lp: torch.Tensor, lm: torch.Tensor,
               grads: torch.Tensor | list[float], sig: _Signals) -> StepResult:
        """The step on its way to the guard, with the ranks' stop flag queued with it. Pipelined, its update
        is queued now (a no-op on the device if g is not finite); else accept() applies it once read."""
        t, flag = time.time(), dist.stop_flag(sig.got, lp.device)
        if not self.pipe.lazy:
            return StepResult(step, seeds, lr, t, lp.tolist() + lm.tolist() + list(grads) + [float(f) for f in flag])
        snap = snapshot(self.s)
        sgd_update_(self.s.trainable, seeds, grads, lr, self.zc.weight_decay)
        return StepResult(step, seeds, lr, t, HostCopy(torch.cat([lp, lm, grads, *flag])), snap, queued=True)

    def log_work(self) -> None:
        """Every --log-every steps: the engine's work saved (host-side counts: no need to wait for the GPU)."""
        if not (self.main and self.rc.log_every and self.step % self.rc.log_every == 0):
            return
        st = self.engine.stats.summary()
        self.bar.write(file=sys.stderr, s=f"step {self.step}: token×layer work {st['token_layers_computed']:,} computed vs "
                       f"{st['token_layers_naive']:,} naive two-pass ({st['work_saved']:.1%} saved)"
                       + (f", prefix-cache hits {st['prefix_cache_hit_rate']:.1%}" if st["prefix_cache_hit_rate"] else ""))

    def boundary(self, sig: _Signals) -> bool:
        """After self.step steps: is work due that needs the parameters as accepted so far?"""
        at, rc = self.step, self.rc
        every = lambda k: k and at % k == 0  # noqa: E731
        return at >= rc.steps or bool(every(rc.eval_every)) or bool(every(rc.save_every)) or (self.world == 1 and bool(sig.got))

    def read_due(self, boundary: bool) -> bool:
        """Read the queued steps that are due (all of them at a boundary or a signal). True: none was rejected
        and none is left queued."""
        while (r := self.pipe.next_due(boundary or bool(self.signalled))) is not None:
            if not self.accept(r):
                return False
        return not self.pipe.inflight

    def accept(self, r: StepResult) -> bool:
        """Read step r's losses; log and count it, or reject it. (Synchronous steps update here.)"""
        lp, lm, grads, flag = r.read()
        self.signalled = flag or self.signalled  # some rank was signalled during this step: all stop together
        losses = lp if r.query is not None else None  # a method's step: every row's loss
        loss = sum(losses) / len(losses) if losses is not None else sum(a + b for a, b in zip(lp, lm)) / (2 * len(r.seeds))
        if losses is not None:
            grads = self.method.grads(r.query, losses)
        if why := self.guard.verdict(loss, grads + (losses or [])):
            self.reject(r, why)
            return False
        if self.main:  # synchronous: written ahead of the update. Pipelined: the update is already queued, but no
            # checkpoint is written before a flush has logged every queued step, so a crash loses both together
            self.slog.write({"step": r.step, "seeds": r.seeds, "grads": grads, "lr": r.lr, "loss": loss}
                            | ({"losses": losses} if losses is not None else {}))
        if r.queued:
            self.undo, self.undo_state = r.snap, r.snap_state
        else:
            self.undo, self.undo_state = snapshot(self.s), self.method and self.method.state_dict()
            if losses is not None:
                update_method_(self.method, self.s.trainable, r.query, losses, r.lr, self.zc.weight_decay)
            else:
                sgd_update_(self.s.trainable, r.seeds, grads, r.lr, self.zc.weight_decay)
        self.applied += 1
        self.guard.accept(loss)
        self.log_step(r, loss, sum(grads) / len(grads))
        return True

    def log_step(self, r: StepResult, loss: float, g_mean: float) -> None:
        """The progress bar and step r's metrics row."""
        now = time.time()
        dt, self.t_prev = r.t - self.t_prev, r.t  # between queueing this step and the one before
        self.ema = loss if self.ema is None else 0.95 * self.ema + 0.05 * loss
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.ema:.4f}", g=f"{g_mean:+.3g}", s_step=f"{dt:.3f}", refresh=False)
        if not self.main:
            return
        self.emit({"step": r.step + 1, "loss": loss, "projected_grad": g_mean, "lr": r.lr,
                   "forwards": self.rows() * (r.step + 1),  # forward rows so far, rejected steps' included (rows())
                   "seconds": round(now - self.t_start, 3), "train_seconds": round(self.train_seconds(), 3),
                   "step_seconds": round(dt, 4)})
        if now - self.t_flush > 2:  # readable while the run goes on, without a write call per step
            self.metrics.flush()
            self.t_flush = now

    def reject(self, r: StepResult, why: str) -> None:
        """Step r is rejected: undo the update before it, lower the lr, and go on from the step after r."""
        undoing = self.applied > 0
        stop = self.guard.strike(undoing)
        if undoing:  # the update before this loss is the suspect: undo it exactly
            self.undo_update()
        elif r.queued and r.snap is not None:  # nothing to undo, but r's update (and the next one) ran: LoRA's copy
            restore_copy(self.s, r.snap)  # before r's update holds the accepted updates (a method's state too)
            if r.snap_state is not None:
                self.method.load_state_dict(r.snap_state)
        elif r.queued:  # the same in full mode: the checkpoint and the logged updates
            rewind(self.s, self.ckpt, self.applied, self.zc.eps_value, self.zc.weight_decay)
        if undoing or r.queued:
            dist.barrier()  # every rank has read the checkpoint before rank 0 replaces it below
        if undoing and self.main:
            self.slog.write({"step": r.step, "revert_to": self.applied, "reason": why, "lr_scale": self.guard.lr_scale})
        if self.main and (undoing or stop):  # a stop is marked: its --resume may lower --lr, with fresh strikes
            self.metrics.flush()  # a checkpoint never runs ahead of the metrics rows it covers
            save_checkpoint(self.s, self.ckpt, self.state(r.step + 1) | ({"stopped": "guard"} if stop else {}), self.undo,
                            self.undo_state)
        if stop:
            if self.main:
                self.slog.close()
            self.bar.close()
            raise ZoftError(self.guard.stop_message(why, r.step, self.ckpt))
        if self.main:
            self.bar.write(file=sys.stderr, s=f"step {r.step + 1}: {why}; undid the last update, lr × "
                           f"{self.rc.guard_lr_factor} (strike {self.guard.strikes}/{self.rc.guard_strikes})")
        self.pipe.clear()
        self.step = self.bar.n = r.step + 1
        self.bar.refresh()

    def undo_update(self) -> None:
        """Undo the last update exactly: θ (zoft.train.checkpoint.undo_last) and a method's state with it, from the
        copies taken before it, or (no copy) from the checkpoint, which load_checkpoint restores together."""
        prev = self.undo_state if self.undo is not None else None
        self.applied = undo_last(self.s, self.ckpt, self.undo, self.applied, self.zc.eps_value, self.zc.weight_decay)
        if prev is not None:
            self.method.load_state_dict(prev)
        self.undo = self.undo_state = None

    def checkpoints(self, at: int) -> None:
        """After `at` accepted steps: the dev evaluation (and test's, --eval-test) and the checkpoint that are
        due then. Their time is not training time (train_seconds)."""
        if not self.main:
            return
        t0, rc = time.time(), self.rc
        self.metrics.flush()
        if rc.eval_every and at % rc.eval_every == 0 and self.enc["dev"]:
            row = evaluation_row(self.engine, self.s, self.enc, self.splits, at, rc.eval_batch_size, rc.eval_test)
            dev = row[f"dev_{self.metric}"]
            self.emit(row | self.s.trainable.norms())
            self.bar.write(file=sys.stderr, s=f"step {at}: dev {self.metric} {dev:.4f}" + (" (best)" if dev > self.best_dev else ""))
            if dev > self.best_dev:
                self.best_dev = dev
                save_checkpoint(self.s, os.path.join(self.out, "best"), {"step": at, "dev_score": dev})
        if (rc.save_every and at % rc.save_every == 0) or at == rc.steps:
            self.metrics.flush()  # a checkpoint never runs ahead of the metrics rows it covers
            self.slog.sync()
            save_checkpoint(self.s, self.ckpt, self.state(at), self.undo, self.undo_state)
            if rc.save_total_limit and rc.save_every and at % rc.save_every == 0:
                keep_numbered(self.ckpt, at, rc.save_total_limit)
        self.paused += time.time() - t0

    def catch_up(self, records: list[dict]) -> None:
        """--resume: redo the steps logged after the checkpoint as the run did them, without their forwards:
        the updates and guard reverts, the metrics rows, and the dev evaluations and checkpoints due."""
        s, zc = self.s, self.zc
        for r in records:
            self.step = r["step"] + 1
            if "revert_to" in r:  # logged by reject(), which then saved a checkpoint
                self.undo_update()
                dist.barrier()
                stop = self.guard.replay_strike(r["lr_scale"])
                if self.main:
                    self.metrics.flush()
                    save_checkpoint(s, self.ckpt, self.state(self.step) | ({"stopped": "guard"} if stop else {}), self.undo,
                                    self.undo_state)
                if stop:
                    raise ZoftError(self.guard.stop_message(r["reason"], r["step"], self.ckpt))
                continue
            self.undo, self.undo_state = snapshot(s), self.method and self.method.state_dict()
            steplog.apply(s.trainable, r, s.full_step if zc.mode == "full" else "rows", zc.eps_value, zc.weight_decay,
                          self.method)
            self.applied += 1
            self.guard.accept(r["loss"])
            if self.main:  # the row the run wrote for this step, again (its seconds are this process's)
                self.emit({"step": self.step, "loss": r["loss"], "projected_grad": sum(r["grads"]) / len(r["grads"]),
                           "lr": r["lr"], "forwards": self.rows() * self.step,
                           "seconds": round(time.time() - self.t_start, 3),
                           "train_seconds": round(self.train_seconds(), 3), "replayed": True})
            self.checkpoints(self.step)

    def stop_if_signalled(self, sig: _Signals) -> None:
        """A SIGINT/SIGTERM (on any rank): save the checkpoint and stop. Ranks stop at the same step, or the
        others would wait forever in the next all-reduce."""
        got = (sig.got or 0) if self.world == 1 else self.signalled
        if not got:
            return
        if self.main:
            self.metrics.flush()
            self.slog.sync()
            save_checkpoint(self.s, self.ckpt, self.state(self.step), self.undo, self.undo_state)
            self.close()
        dist.barrier()  # no rank exits before the checkpoint is written (torchrun would kill rank 0)
        self.bar.close()
        raise Interrupted(f"{signal.Signals(got).name} at step {self.step}: checkpoint saved in {self.ckpt}; resume "
                          "with the same command plus --resume", 128 + got)

    def state_bytes(self) -> int:
        """The --optimizer method's state (ZO-SGD: none): what it holds beside θ between steps."""
        if self.method is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self.method.state.values())

    def close(self) -> None:
        self.metrics.close()
        self.reporters.close()
        self.slog.close()

    def results(self) -> dict:
        """After the loop: the best dev checkpoint on the test set, the adapter, results.json (rank 0)."""
        rc, s = self.rc, self.s
        here = time.time() - self.t_loop - self.paused  # this process's training, without evaluations and saves
        trained = self.train_seconds()  # the run's, read before the final evaluation below (not training either)
        if not self.main:
            dist.barrier()
            return {}
        self.close()
        result = finish(s, self.engine, self.enc, self.splits, self.out, rc.eval_batch_size, self.best_dev)
        result |= {f"zero_shot_{self.metric}": self.zero_shot, "steps": rc.steps,
                   "seconds": round(time.time() - self.t_start, 1), "train_seconds": round(trained, 1),
                   "seconds_per_step": round(here / max(1, rc.steps - self.first), 4),
                   "forwards": self.rows() * rc.steps, "optimizer": self.zc.optimizer,
                   "trained_parameters": s.trainable.n_trained(), "optimizer_state_bytes": self.state_bytes(),
                   "path": s.path, "world_size": self.world, "output_dir": self.out, **self.engine.stats.summary(),
                   **peak_memory(s.device)}
        if s.loras is not None or s.prefix is not None:
            write_model_card(os.path.join(self.out, "adapter"), self.cfg, peft_base(s.source, s.folder),
                             self.plan.task.name, result)
        rundir.write_json(os.path.join(self.out, "results.json"), result)
        dist.barrier()
        return result
