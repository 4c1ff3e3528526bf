"""zoft: zeroth-order (MeZO) fine-tuning of causal language models with an inference-engine forward.

    from zoft import Trainer, TrainConfig
    result = Trainer(TrainConfig(), train_dataset=rows, eval_dataset=dev_rows).train()
"""

from zoft.config import ModelConfig, RunConfig, TaskConfig, TrainConfig, ZOConfig
from zoft.version import __version__

__all__ = ["Callback", "ModelConfig", "RunConfig", "TaskConfig", "TrainConfig", "Trainer", "ZOConfig", "__version__"]


def __getattr__(name: str):
    """Trainer and Callback import torch: only when asked for, so `zoft --help` stays quick."""
    if name == "Trainer":
        from zoft.api import Trainer

        return Trainer
    if name == "Callback":
        from zoft.tracking import Callback

        return Callback
    raise AttributeError(f"module 'zoft' has no attribute {name!r}")
