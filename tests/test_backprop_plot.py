"""The AdamW baseline learns on the same pipeline, and `zoft plot` draws runs."""

import json

from tests.tiny import make_tiny
from zoft.cli import main
from zoft.config import ModelConfig, RunConfig, TaskConfig, TrainConfig, ZOConfig
from zoft.train.loop import train


def test_adamw_baseline_lowers_training_loss_and_plot_draws_it(tmp_path, capsys):
    folder = make_tiny("opt", str(tmp_path))
    out = tmp_path / "run"
    cfg = TrainConfig(ModelConfig(model=folder), TaskConfig(n_train=8, n_dev=8, n_test=8),
                      ZOConfig(mode="lora", optimizer="adamw", lr=3e-2, batch_size=8),
                      RunConfig(steps=15, output_dir=str(out), eval_every=5))
    result = train(cfg)
    assert result["optimizer"] == "adamw" and result["peak_memory_mb"] > 0
    losses = [json.loads(x)["loss"] for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert len(losses) == 15 and losses[-1] < losses[0] - 0.05  # same 8 examples each step: it must fit them
    png = tmp_path / "c.png"
    main(["plot", str(out), "--output", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from zoft.plot import read_metrics

    for x, want in (("steps", list(range(1, 16))), ("forwards", list(range(1, 16)))):  # backprop: one forward a step
        xs, _, dxs, _, _ = read_metrics(str(out), x)
        assert xs == want and dxs == [5, 10, 15], x
    xs, _, dxs, _, _ = read_metrics(str(out), "seconds")
    assert xs == sorted(xs) and dxs == [xs[4], xs[9], xs[14]]  # a dev point sits at its step's time
    main(["plot", str(out), "--output", str(png), "--x", "seconds"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
