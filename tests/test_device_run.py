"""bench/device_run.py: every recipe's commands parse with zoft's CLI, a GGUF in parts is joined and checked,
and a recipe runs end to end on the CPU (a tiny model trained, replayed and compared bitwise)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from zoft.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def load_device_run():
    spec = importlib.util.spec_from_file_location("device_run", ROOT / "bench" / "device_run.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["device_run"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


dr = load_device_run()


def test_every_recipe_command_parses_with_the_cli(tmp_path):
    ctx = dr.Ctx(tmp_path, tmp_path, "MODEL", "cuda", None, resume=True, dry_run=True)
    for picks in {rcp.picks for rcp in dr.recipes().values() if rcp.picks}:
        (tmp_path / picks).write_text(json.dumps({f"arm{k}": "--lr 1e-3 --steps 10" for k in range(3)}))
    parser = build_parser()
    checked = 0
    for name, rcp in dr.recipes().items():
        jobs = rcp.before + rcp.jobs
        assert len({j.name for j in jobs}) == len(jobs), f"{name}: two jobs share a name (and a log)"
        for job in jobs:
            argv = dr.command(job, rcp, ctx)
            if argv[1:3] == ["-m", "zoft"]:
                try:
                    parser.parse_args(argv[3:])
                except SystemExit:
                    pytest.fail(f"{name}/{job.name}: zoft rejects {' '.join(argv[3:])}")
                checked += 1
    assert checked > 100


def test_recipes_keep_the_recorded_arguments(tmp_path):
    """Spot checks against the commands behind docs/results.md's seventh-session table."""
    ctx = dr.Ctx(tmp_path, tmp_path, "M", "cuda", None, resume=False, dry_run=True)
    rcp = dr.recipes()["rt-low-lr-50k"]
    job = next(j for j in rcp.jobs if j.name == "c1_top12_50k_seed2")
    ns = build_parser().parse_args(dr.command(job, rcp, ctx)[3:])
    assert (ns.layers, ns.lr, ns.eps, ns.schedule, ns.clip_grad, ns.steps, ns.seed, ns.n_dev, ns.n_test) == (
        "top12", 1e-3, 1e-2, "cosine", 1.0, 50000, 2, 200, 500)
    assert job.gpu == 0 and rcp.run_limit == 550 and rcp.keep_state


def test_gguf_parts_are_joined_and_checked(tmp_path):
    blob = bytes(range(256)) * 1000
    (tmp_path / "m.gguf.part00").write_bytes(blob[:100_000])
    (tmp_path / "sent").mkdir()
    (tmp_path / "sent" / "m.gguf.part01").write_bytes(blob[100_000:])
    work = tmp_path / "work"
    work.mkdir()
    (work / "m.gguf.part00").write_bytes(blob[:100_000])  # as --stage leaves it in an earlier call
    bad = "0" * 64
    with pytest.raises(dr.UserError, match="sha256"):
        dr.assemble_gguf(["m.gguf.part00", str(tmp_path / "sent" / "m.gguf.part01")], bad, work)
    assert not (work / "m.gguf").exists()
    sha_file = tmp_path / "sha"
    sha_file.write_text(hashlib.sha256(blob).hexdigest() + "  m.gguf\n")
    out = dr.assemble_gguf(["m.gguf.part00", str(tmp_path / "sent" / "m.gguf.part01")],
                           dr.sha256_of(str(sha_file)), work)
    assert out == work / "m.gguf" and out.read_bytes() == blob


def test_user_errors_exit_2(tmp_path, capsys):
    assert dr.main(["--out", str(tmp_path), "no-such-recipe"]) == 2
    assert dr.main(["--out", str(tmp_path), "rt-top16"]) == 2  # no model
    assert dr.main(["--out", str(tmp_path), "--gguf-parts", "a.part00", "rt-top16"]) == 2  # no sha256
    assert dr.main(["--out", str(tmp_path), "tests", "--only", "nothing"]) == 2
    assert dr.main(["--out", str(tmp_path), "--stage", "a.part00", "tests"]) == 2  # the recipe taken as a file
    err = capsys.readouterr().err
    assert err.count("device_run: error:") == 5 and "put the recipes before" in err


def test_smoke_recipe_runs_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, work = tmp_path / "out", tmp_path / "work"
    assert dr.main(["--out", str(out), "--work", str(work), "--device", "cpu", "smoke"]) == 0
    summary = (out / "summary.txt").read_text()
    assert "replay bitwise: OK" in summary and "smoke_train: rc=0" in summary
    assert sorted(p.name for p in out.iterdir()) == ["logs.tgz", "summary.txt"]
    assert json.loads((work / "smoke" / "run" / "results.json").read_text())["steps"] == 20


def test_rt_compare_takes_its_arms_from_the_sweep(tmp_path):
    """bench/pick_methods.py keeps each method's best-dev rate, puts ZO-SGD first and the best others after it,
    and rt-compare's `{armK}` arguments become those flags (zoft's CLI parses them)."""
    spec = importlib.util.spec_from_file_location("pick_methods", ROOT / "bench" / "pick_methods.py")
    pm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pm)
    sweep = [("zo-sgd", 1e-3, 0.70, {"clip_grad": 1.0, "directions": 1}, 2000),
             ("zo-sgd", 3e-3, 0.75, {"clip_grad": 1.0, "directions": 1}, 2000),
             ("fzoo", 1e-4, 0.80, {"directions": 8, "clip_grad": 0.0}, 1000),
             ("fzoo", 1e-3, 0.60, {"directions": 8, "clip_grad": 0.0}, 1000),
             ("zo-adam", 1e-4, 0.78, {"directions": 1, "momentum": 0.9, "clip_grad": 0.0}, 2000),
             ("hizoo", 3e-4, 0.50, {"directions": 1, "hizoo_alpha": 1e-6, "clip_grad": 0.0}, 1600)]
    for m, lr, dev, zo, steps in sweep:
        d = tmp_path / "runs" / f"sweep_{m}_lr{lr:g}"
        d.mkdir(parents=True)
        (d / "zoft_config.json").write_text(json.dumps({"zo": {"optimizer": m, "lr": lr, **zo},
                                                        "run": {"steps": steps, "seed": 0}}))
        (d / "results.json").write_text(json.dumps({"best_dev_accuracy": dev, "final_accuracy": dev}))
    assert pm.main([str(tmp_path / "runs"), "--out", str(tmp_path / "rt-picked.json")]) == 0
    picked = json.loads((tmp_path / "rt-picked.json").read_text())
    assert picked["best"]["zo-sgd"]["lr"] == 3e-3 and picked["best"]["fzoo"]["lr"] == 1e-4

    ctx = dr.Ctx(tmp_path, tmp_path, "M", "cuda", None, resume=False, dry_run=False)
    rcp = dr.recipes()["rt-compare"]
    parsed = {j.name: build_parser().parse_args(dr.command(j, rcp, ctx)[3:]) for j in rcp.jobs}
    a0, a1, a2 = (parsed[f"rt-cmp_arm{k}_seed2"] for k in range(3))
    assert (a0.optimizer, a0.lr, a0.clip_grad, a0.steps, a0.seed, a0.eval_test) == ("zo-sgd", 3e-3, 1.0, 4000, 2, True)
    assert (a1.optimizer, a1.lr, a1.directions, a1.steps) == ("fzoo", 1e-4, 8, 2000)
    assert (a2.optimizer, a2.lr, a2.momentum) == ("zo-adam", 1e-4, 0.9)
    (tmp_path / "rt-picked.json").unlink()
    with pytest.raises(dr.UserError, match="run the sweep"):
        dr.command(rcp.jobs[0], rcp, ctx)


def test_resume_keeps_a_fresh_recipes_run_folder(tmp_path):
    """A fresh recipe removes a train job's folder before it runs, but not under --resume: the folder holds the
    checkpoint a stopped run continues from (the eleventh session lost no run to this only by resuming by hand)."""
    rcp = dr.recipes()["rt-compare"]
    job = next(j for j in rcp.jobs if j.kind == "train")
    run = f"{tmp_path}/runs/{job.name}"
    assert run in dr.to_clean(job, rcp, dr.Ctx(tmp_path, tmp_path, "M", "cuda", None, resume=False, dry_run=False))
    assert run not in dr.to_clean(job, rcp, dr.Ctx(tmp_path, tmp_path, "M", "cuda", None, resume=True, dry_run=False))


def test_zo_sgd_with_several_directions_competes_as_its_own_arm(tmp_path):
    """rt-compare-high: ZO-SGD with n = 4 directions is "zo-sgd×4", ranked among the other methods; plain ZO-SGD
    stays arm0 even when the n = 4 run scored higher, and the n = 4 arm carries its directions and clip; the
    recipe runs arm0 and arm1."""
    spec = importlib.util.spec_from_file_location("pick_methods", ROOT / "bench" / "pick_methods.py")
    pm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pm)
    sweep = [("zo-sgd", 1e-2, 0.70, 1), ("zo-sgd", 1e-2, 0.80, 4), ("zo-adam", 3e-3, 0.75, 1)]
    for m, lr, dev, n in sweep:
        d = tmp_path / "runs" / f"rt-sweep-high_{m}{n}_lr{lr:g}"
        d.mkdir(parents=True)
        (d / "zoft_config.json").write_text(json.dumps({"zo": {"optimizer": m, "lr": lr, "directions": n, "clip_grad":
                                                               1.0 if m == "zo-sgd" else 0.0}, "run": {"steps": 2000}}))
        (d / "results.json").write_text(json.dumps({"best_dev_accuracy": dev}))
    out = tmp_path / "rt-picked-high.json"
    assert pm.main([str(tmp_path / "runs"), "--prefix", "rt-sweep-high_", "--out", str(out), "--steps-scale", "3"]) == 0
    picked = json.loads(out.read_text())
    ctx = dr.Ctx(tmp_path, tmp_path, "M", "cuda", None, resume=False, dry_run=False)
    rcp = dr.recipes()["rt-compare-high"]
    parsed = {j.name: build_parser().parse_args(dr.command(j, rcp, ctx)[3:]) for j in rcp.jobs}
    assert set(parsed) == {f"rt-cmp-high_arm{k}_seed{s}" for k in (0, 1) for s in (0, 1, 2)}
    a0, a1 = parsed["rt-cmp-high_arm0_seed0"], parsed["rt-cmp-high_arm1_seed0"]
    assert (a0.optimizer, a0.lr, a0.directions, a0.clip_grad, a0.steps) == ("zo-sgd", 1e-2, 1, 1.0, 6000)
    assert (a1.optimizer, a1.lr, a1.directions, a1.clip_grad, a1.steps) == ("zo-sgd", 1e-2, 4, 1.0, 6000)
    assert picked["arm2"] == "--optimizer zo-adam --lr 0.003 --steps 6000 --directions 1"


def test_the_squad_slice_loads_with_train_and_test_articles_apart():
    """bench/data/squad_slice (issue 16's second task): zoft's SQuAD task reads it with --data-dir, draws the
    recipe's 800 / 200 / 500 from it, and no test passage is a training passage."""
    from zoft.tasks import draw_splits, get_task

    rcp = dr.recipes()["squad-slice-compare"]
    folder = ROOT / rcp.common[rcp.common.index("--data-dir") + 1]
    task = get_task("squad", data_dir=str(folder))
    splits = draw_splits(task, n_train=800, n_dev=200, n_test=500, seed=0).examples
    assert {k: len(v) for k, v in splits.items()} == {"train": 800, "dev": 200, "test": 500}
    context = lambda e: e.prompt.split("\nQuestion:")[0]  # noqa: E731  "Title: …\nContext: …"
    train_pool = {context(e) for e in task.load_split("train")}
    assert not train_pool & {context(e) for e in splits["test"]}
    assert all(e.answers for e in splits["test"])
