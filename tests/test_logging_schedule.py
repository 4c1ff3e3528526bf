"""Messages go through the `zoft` logger (silenced the standard way); the lr schedule equals transformers'
where the two define the same thing."""

import logging
import math

import pytest
import torch

from zoft.session import log
from zoft.zo.update import lr_at


def test_messages_use_the_zoft_logger(capsys):
    log("zoft: hello")
    assert capsys.readouterr().err == "zoft: hello\n"
    logging.getLogger("zoft").setLevel(logging.WARNING)
    try:
        log("zoft: quiet")
        assert capsys.readouterr().err == ""
    finally:
        logging.getLogger("zoft").setLevel(logging.INFO)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedule_equals_transformers_without_warmup(schedule):
    """zoft's lr_at against transformers.get_scheduler (through a one-parameter optimizer). They agree to
    rounding without warm-up. With warm-up they differ by design: transformers' first step runs at lr 0
    (a forward pair spent for nothing in ZO), zoft's at lr/warmup; so zoft keeps its own function."""
    from transformers import get_scheduler

    total, base = 50, 1e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = get_scheduler(schedule, opt, num_warmup_steps=0, num_training_steps=total)
    for step in range(total):
        assert math.isclose(lr_at(step, total, base, schedule, 0), sched.get_last_lr()[0], rel_tol=1e-9, abs_tol=1e-15)
        opt.step()
        sched.step()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    warm = get_scheduler(name, opt, num_warmup_steps=5, num_training_steps=total)
    assert warm.get_last_lr()[0] == 0.0 and lr_at(0, total, base, schedule, 5) == base / 5
