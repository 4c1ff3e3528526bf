"""The training data of a run: its examples tokenized for the model, the splits it records, and the
examples of each step (a per-epoch permutation seeded by (seed, epoch), so a step is a function of its index).
"""

from __future__ import annotations

import os
import random

from zoft.config import TrainConfig
from zoft.errors import ZoftError
from zoft.loading import load_tokenizer, resolve
from zoft.session import Session, log, resolve_alias
from zoft.tasks.encode import Encoded, encode
from zoft.tasks.rows import ChatFn, chat_renderer
from zoft.train import rundir
from zoft.train.resume import Plan, prepare_data


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


def model_chat(mc) -> ChatFn:
    """Chat rows are rendered with the model's own tokenizer, loaded (without the weights) when first needed."""
    return chat_renderer(lambda: load_tokenizer(resolve(resolve_alias(mc.model))))


def load_data(cfg: TrainConfig, s: Session, plan: Plan | None = None) -> tuple[dict[str, list[Encoded]], dict, str]:
    """Tokenize the drawn splits (the plan's, or drawn here) for the session's model; and the loss."""
    _, drawn, loss = (plan.task, plan.drawn, plan.loss) if plan else prepare_data(cfg, chat_renderer(lambda: s.tokenizer))
    if loss == "f1" and not s.native:
        raise ZoftError("--loss f1 needs a generation task and a native model (OPT, Llama family)")
    splits = drawn.examples
    enc = {}
    for name, exs in splits.items():
        enc[name], n_trunc = encode(s.tokenizer, exs, s.max_length, cfg.model.truncation)
        if n_trunc:
            log(f"zoft: {name}: {n_trunc} of {len(exs)} prompts truncated from the left to {s.max_length} tokens")
    return enc, splits, loss


def write_splits(out: str, cfg: TrainConfig, plan: Plan) -> None:
    """RUN/splits.json: which examples the run trains, selects and tests on, and the data they came from."""
    tc = cfg.task
    ab = lambda p: os.path.abspath(p) if p and os.path.exists(p) else p  # noqa: E731 - a path moves, a name doesn't
    files = {k: ab(v) for k, v in (("train", tc.train_file), ("dev", tc.validation_file), ("test", tc.test_file)) if v}
    source = plan.task.name if plan.task.name == "datasets" else ab(tc.task)  # "datasets": the Python API's data
    about = {"task": "" if files else source, "files": files, "name": plan.task.name, "kind": plan.task.kind,
             "data_dir": ab(tc.data_dir), "template": tc.template, "seed": cfg.run.seed, "k_shot": tc.k_shot,
             "asked": {"train": tc.n_train, "dev": tc.n_dev, "test": tc.n_test}}
    rundir.write_json(os.path.join(out, rundir.SPLITS), plan.drawn.manifest(**about))


def metric_of(splits: dict) -> str:
    """What a run's evaluations report: accuracy (multiple choice) or F1 (generation; exact match beside it)."""
    return "f1" if splits["train"] and splits["train"][0].kind == "gen" else "accuracy"
