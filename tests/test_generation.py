"""Generation tasks end to end: LM loss on the answer tokens, greedy decoding, exact match and F1."""

import json

from tests.tiny import make_tiny
from zoft.config import ModelConfig, RunConfig, TaskConfig, TrainConfig, ZOConfig
from zoft.tasks.metrics import qa_scores
from zoft.train.loop import train


def test_generation_task_trains_with_lm_loss_and_reports_f1(tmp_path):
    folder = make_tiny("llama", str(tmp_path))
    data = tmp_path / "qa.jsonl"
    with open(data, "w") as f:
        for i in range(40):  # a single pool keeps a fifth for test and a fifth for dev
            f.write(json.dumps({"input": f"Question: what is {i} plus one?\nAnswer:", "output": f" {i + 1}\n"}) + "\n")
    out = tmp_path / "run"
    cfg = TrainConfig(ModelConfig(model=folder), TaskConfig(task=str(data), n_train=12, n_dev=4, n_test=8),
                      ZOConfig(mode="lora", lr=1e-2, batch_size=4), RunConfig(steps=3, output_dir=str(out)))
    cfg.run.eval_every = 3
    result = train(cfg)
    assert result["metric"] == "f1" and 0.0 <= result["final_f1"] <= 1.0 and 0.0 <= result["final_exact_match"] <= 1.0
    # F1 is named F1 everywhere: results.json, the metrics rows, the checkpoint's state; never "accuracy"
    saved = json.loads((out / "results.json").read_text())
    assert saved["final_f1"] == result["final_f1"] and {"zero_shot_f1", "best_dev_f1"} <= saved.keys()
    assert not [k for k in saved if "accuracy" in k]
    assert any("dev_f1" in x for x in open(out / "metrics.jsonl")) and "accuracy" not in (out / "metrics.jsonl").read_text()
    from zoft.plot import read_metrics

    assert read_metrics(str(out))[4] == "f1"  # the plot's dev axis says F1
    rows = [json.loads(x) for x in open(out / "test_predictions.jsonl")]
    assert len(rows) == 8 and all("\n" not in r["prediction"] for r in rows)
    assert qa_scores([r["prediction"] for r in rows], [r["answers"] for r in rows])["f1"] == result["final_f1"]
    losses = [json.loads(x)["loss"] for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert all(x > 0 for x in losses)  # NLL of the answer tokens, not a CE over one candidate (which is 0)


def test_in_context_demonstrations_prefix_every_prompt_with_gold_answers():
    from zoft.evaluate import with_demonstrations
    from zoft.tasks import Example

    demos = [Example("a It was", [" terrible", " great"], 1), Example("b It was", [" terrible", " great"], 0)]
    test = [Example("c It was", [" terrible", " great"], 1)]
    got = with_demonstrations(test, demos)
    assert got[0].prompt == "a It was great\n\nb It was terrible\n\nc It was"
    assert got[0].candidates == test[0].candidates and got[0].answer == 1 and test[0].prompt == "c It was"


def test_unknown_model_name_suggests_the_closest_valid_ones(monkeypatch):
    import pytest

    from zoft.errors import ZoftError
    from zoft.loading import resolve

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ZoftError, match="did you mean facebook/opt-125m"):
        resolve("facebook/opt-125n")


def test_f1_objective_matches_evaluation_and_trains(tmp_path):
    """--loss f1: each row's loss is −F1 of its greedy answers, the same F1 evaluation reports."""
    from zoft.config import ModelConfig as MC
    from zoft.evaluate import answers_of, evaluate_generation
    from zoft.session import attach, load_session
    from zoft.tasks import get_task, sample_splits
    from zoft.tasks.encode import encode
    from zoft.train.losses import f1_row_losses

    folder = make_tiny("llama", str(tmp_path))
    data = tmp_path / "qa.jsonl"
    with open(data, "w") as f:
        for i in range(12):
            f.write(json.dumps({"input": f"Q{i}: say hi\nA:", "output": " hi there\n"}) + "\n")
    s = load_session(MC(model=folder))
    attach(s, ZOConfig(mode="lora"))
    exs = sample_splits(get_task(str(data)), 6, 0, 0)["train"]
    enc, _ = encode(s.tokenizer, exs, s.max_length)
    ev = evaluate_generation(s.model, s.tokenizer, enc, exs)
    loss = f1_row_losses(s, enc, [answers_of(e) for e in exs], rows=2)
    assert loss.shape == (2,) and abs(loss[0].item() + ev["f1"]) < 1e-12 and loss[0] == loss[1]
    out = tmp_path / "run"
    cfg = TrainConfig(ModelConfig(model=folder), TaskConfig(task=str(data), n_train=6, n_dev=0, n_test=3, loss="f1"),
                      ZOConfig(mode="lora", batch_size=3), RunConfig(steps=2, output_dir=str(out), zero_shot=False))
    result = train(cfg)
    assert result["metric"] == "f1"
    rows = [json.loads(x) for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert len(rows) == 2 and all(-1.0 <= r["loss"] <= 0.0 for r in rows)


def test_eval_cli_reports_f1_and_exact_match_for_generation(tmp_path, capsys):
    from zoft.cli import main

    folder = make_tiny("llama", str(tmp_path))
    data = tmp_path / "qa.jsonl"
    with open(data, "w") as f:
        for i in range(20):
            f.write(json.dumps({"input": f"Question: what is {i} plus one?\nAnswer:", "output": f" {i + 1}\n"}) + "\n")
    main(["eval", "--model", folder, "--task", str(data), "--n-test", "4", "--output", str(tmp_path / "p.jsonl")])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(x) for x in open(tmp_path / "p.jsonl")]
    want = qa_scores([r["prediction"] for r in rows], [r["answers"] for r in rows])
    assert out["n"] == 4 and out["f1"] == want["f1"] and out["exact_match"] == want["em"]
    assert "accuracy" not in out
