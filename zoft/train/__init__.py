"""Training: the loop (loop.py) and what it is made of: the step (step.py, losses.py), the divergence guard
(guard.py), the one-deep pipeline (pipeline.py), checkpoints (checkpoint.py), the step log (steplog.py),
run folders and resume checks (rundir.py, resume.py), replay (replay.py) and the backprop baseline.

`train` and `replay` are what users call; they are imported when first asked for, so that
`from zoft.train import rundir` stays light."""


def __getattr__(name: str):
    if name == "train":
        from zoft.train.loop import train

        return train
    if name == "replay":
        from zoft.train.replay import replay

        return replay
    raise AttributeError(f"module 'zoft.train' has no attribute {name!r}")
