"""The Python API: `Trainer(config, train_dataset=..., eval_dataset=..., callbacks=[...]).train()`.

Data may be a `datasets.Dataset` or a list of dicts in any row format zoft reads (zoft.tasks.rows), so
what works from a file on the command line works from memory. Without datasets, `config.task` says
where the data is, as `zoft train --task` does.
"""

from __future__ import annotations

from collections.abc import Sequence

from zoft.config import TrainConfig
from zoft.tasks import rows
from zoft.tracking import Callback


class Trainer:
    """Train with MeZO (or the AdamW baseline) as `config` says.

    train_dataset: the training pool (`config.task.n_train` examples are drawn from it, seeded);
    eval_dataset: the dev pool (evaluated every `config.run.eval_every` steps; the best is kept);
    test_dataset: the test pool (zero-shot and final accuracy or F1). All three: a `datasets.Dataset`
    or a list of dicts. callbacks: zoft.Callback objects, called with every metrics row.
    """

    def __init__(self, config: TrainConfig | None = None, train_dataset=None, eval_dataset=None,
                 test_dataset=None, callbacks: Sequence[Callback] = ()):
        self.config = config or TrainConfig()
        self.data = {k: d for k, d in (("train", train_dataset), ("dev", eval_dataset), ("test", test_dataset))
                     if d is not None}
        if self.data and "train" not in self.data:
            raise TypeError("Trainer: eval_dataset/test_dataset need a train_dataset too")
        self.callbacks = list(callbacks)

    def task(self):
        """The in-memory datasets as a zoft task (None: the config's --task source)."""
        if not self.data:
            return None
        from zoft.train.data import model_chat

        tc = self.config.task
        columns = rows.Columns(tc.text_column, tc.label_column, tc.prompt_column, tc.completion_column,
                               tc.messages_column, list(tc.label_names))
        names = {"train": "train_dataset", "dev": "eval_dataset", "test": "test_dataset"}
        splits = {k: rows.from_dataset(d, names[k]) for k, d in self.data.items()}
        return rows.splits_task("datasets", splits, columns, tc.template or None, model_chat(self.config.model))

    def train(self) -> dict:
        """Run training; returns what `zoft train` prints (final accuracy, timings, the output folder)."""
        from zoft.train.loop import train

        return train(self.config, self.task(), self.callbacks)
