"""The --optimizer methods (zoft/zo/methods.py) against references written from their papers' equations, and
zoft's guarantees for each: kill-and-resume bitwise, `zoft replay` bitwise, the guard's undo of a method's
state, seeds that redraw the same perturbation (LOZO's V after a resume mid-interval), the forward-row count,
and bad input refused with one `zoft: error:` line.

The references take the losses from the plain per-sequence forward of tests/test_zo.py at float64 (not the
engine's batched rows), the directions from the same seeds, and do every step's arithmetic in float64 here.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_durability import zoft
from tests.test_zo import examples, lora_model, reference_loss
from tests.tiny import make_tiny
from zoft.config import ZOConfig
from zoft.engine.native import NativeEngine
from zoft.train import steplog
from zoft.train.losses import row_losses
from zoft.zo.methods import METHODS, make_method
from zoft.zo.noise import param_seed
from zoft.zo.perturbers import LoRAPerturber
from zoft.zo.trainable import _flat_z, direction_seeds, lora_trainable

EPS, LR, RUN_SEED = 1e-2, 0.05, 7
NDIRS = {"fzoo": 3, "hizoo": 2, "zo-adam": 2}  # the rest: one direction
HYPER = {"zo-momentum": {"momentum": 0.8}, "zo-adam": {"momentum": 0.85, "beta2": 0.99, "adam_eps": 1e-6},
         "hizoo": {"hizoo_alpha": 0.3}, "lozo": {"lozo_rank": 2, "lozo_interval": 2}, "sparse-mezo": {"sparsity": 0.5},
         "conmezo": {"momentum": 0.7, "cone_angle": 50.0}}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("methods")


# ---- one step against the paper's equations, float64 --------------------------------------------------


class Ref:
    """The reference side: θ as a float64 vector, L(θ) by the plain forward, the directions from the seeds."""

    def __init__(self, model, tr, exs):
        self.model, self.tr, self.exs = model, tr, exs

    @torch.no_grad()
    def loss(self, theta: torch.Tensor) -> float:
        keep = [t.detach().clone() for t in self.tr.tensors]
        for t, v in zip(self.tr.tensors, theta.split([t.numel() for t in self.tr.tensors])):
            t.data.copy_(v.view_as(t))
        out = float(reference_loss(self.model, self.exs))
        for t, v in zip(self.tr.tensors, keep):
            t.data.copy_(v)
        return out

    def z(self, seed: int) -> torch.Tensor:
        return _flat_z(self.tr, seed).double()

    def rademacher(self, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(param_seed(seed, 1))
        return torch.randint(0, 2, (self.tr.numel(),), generator=g).double() * 2 - 1

    def lozo(self, seed: int, step: int, rank: int, interval: int) -> tuple[torch.Tensor, torch.Tensor]:
        """U·Vᵀ per 2-D tensor (V from the run seed and step // ν), and the 1/r scale."""
        vseed, parts, scale = param_seed(RUN_SEED, (1 << 41) + step // interval), [], []
        for i, t in enumerate(self.tr.tensors):
            gu = torch.Generator().manual_seed(param_seed(seed, 2 + i))
            gv = torch.Generator().manual_seed(param_seed(vseed, i))
            U = torch.randn(t.shape[0], rank, generator=gu).double()
            V = torch.randn(t.shape[1], rank, generator=gv).double()
            parts.append((U @ V.T).reshape(-1))
            scale.append(torch.full((t.numel(),), 1 / rank, dtype=torch.float64))
        return torch.cat(parts), torch.cat(scale)


def ref_step(name: str, r: Ref, theta: torch.Tensor, st: dict, seeds: list[int], step: int, hp: dict) -> torch.Tensor:
    """θ after one step of method `name` from the paper's equations (st: the method's state, updated here)."""
    n, L = len(seeds), r.loss
    if name == "fzoo":
        u = [r.rademacher(s) for s in seeds]
        l0, li = L(theta), torch.tensor([L(theta + EPS * v) for v in u], dtype=torch.float64)
        sigma = float(((li - li.mean()) ** 2).mean().sqrt())
        return theta - LR / (n * sigma) * sum((li[i] - l0) * u[i] for i in range(n))
    if name == "hizoo":
        h, z, l0 = st.setdefault("h", torch.ones_like(theta)), [r.z(s) for s in seeds], L(theta)
        u = [zj / h.sqrt() for zj in z]
        lp, lm = [L(theta + EPS * v) for v in u], [L(theta - EPS * v) for v in u]
        out = theta - LR * sum((lp[j] - lm[j]) / (2 * EPS) * u[j] for j in range(n)) / n
        a = hp["hizoo_alpha"]
        st["h"] = (1 - a) * h + a * sum(abs(lp[j] + lm[j] - 2 * l0) / (2 * EPS**2) * z[j] ** 2 * h for j in range(n)) / n
        return out
    if name == "lozo":
        uv = [r.lozo(s, step, hp["lozo_rank"], hp["lozo_interval"]) for s in seeds]
        g = [(L(theta + EPS * u) - L(theta - EPS * u)) / (2 * EPS) for u, _ in uv]
        return theta - LR * sum(g[j] * uv[j][0] * uv[j][1] for j in range(n)) / n
    if name == "sparse-mezo":
        mask = []
        for t in theta.split([t.numel() for t in r.tr.tensors]):
            k = math.ceil((1 - hp["sparsity"]) * t.numel())
            mask.append((t.abs() <= t.abs().sort().values[k - 1]).double())
        u = [r.z(s) * torch.cat(mask) for s in seeds]
    elif name == "conmezo":
        m, u = st.setdefault("m", torch.zeros_like(theta)), [r.z(s) for s in seeds]
        if m.norm() > 0:
            mh, phi = m / m.norm(), math.radians(hp["cone_angle"])
            perp = [v - (v @ mh) * mh for v in u]
            u = [math.sqrt(theta.numel()) * (math.cos(phi) * mh + math.sin(phi) * p / p.norm()) for p in perp]
    else:
        u = [r.z(s) for s in seeds]
    g = [(L(theta + EPS * v) - L(theta - EPS * v)) / (2 * EPS) for v in u]
    ghat = sum(g[j] * u[j] for j in range(n)) / n
    if name == "zo-momentum":
        st["m"] = hp["momentum"] * st.get("m", 0) + ghat
        return theta - LR * st["m"]
    if name == "zo-adam":
        b1, b2, t = hp["momentum"], hp["beta2"], st.get("t", 0) + 1
        st["m"], st["v"], st["t"] = b1 * st.get("m", 0) + (1 - b1) * ghat, b2 * st.get("v", 0) + (1 - b2) * ghat**2, t
        return theta - LR * (st["m"] / (1 - b1**t)) / ((st["v"] / (1 - b2**t)).sqrt() + hp["adam_eps"])
    if name == "zo-sign":
        return theta - LR * ghat.sign()
    if name == "conmezo":
        st["m"] = hp["momentum"] * st["m"] + (1 - hp["momentum"]) * ghat
    return theta - LR * ghat  # sparse-mezo, conmezo


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_steps_equal_the_papers_equations(root, name):
    """Two steps (the second one sees the state the first left) of the engine's method, float64, against
    ref_step; the second step of LOZO starts a new V interval (ν = 2 crosses at step 2: steps 1 and 2 run)."""
    model, loras = lora_model(str(root), "opt", torch.float64)
    tr, exs = lora_trainable(loras), examples()
    engine, pert = NativeEngine(model), LoRAPerturber(loras, tr)
    b = engine.batch(exs)
    hp = HYPER.get(name, {})
    method = make_method(ZOConfig(optimizer=name, directions=NDIRS.get(name, 1), **hp), tr, RUN_SEED)
    r, theta, st = Ref(model, tr, exs), tr.flat_values(copy=True), {}
    start = theta.clone()
    for step in (1, 2):
        seeds = direction_seeds(RUN_SEED, step, NDIRS.get(name, 1))
        want = ref_step(name, r, theta, st, seeds, step, hp)
        q = method.query(tr, seeds, step, EPS)
        losses = row_losses(engine.scores(b, pert.query_rows(q)), b, "candidate").tolist()
        assert len(losses) == method.rows(len(seeds))
        method.update_(tr, q, losses, LR, 0.0)
        theta = tr.flat_values(copy=True)
        assert torch.allclose(theta, want, rtol=1e-7, atol=1e-10), (name, step, float((theta - want).abs().max()))
        theta = want  # the reference goes on from its own θ
    for k, v in st.items():  # the state the equations left
        if torch.is_tensor(v):
            assert torch.allclose(method.state[k], v, rtol=1e-7, atol=1e-10), (name, k)
    assert (theta - start).abs().max() > 1e-6, f"{name} did not move θ"


def test_lozo_v_is_a_function_of_the_interval(root):
    """A fresh LOZO (a resumed run) draws the V the running one holds at any step of an interval; the next
    interval has another V."""
    _, loras = lora_model(str(root), "opt", torch.float32)
    tr = lora_trainable(loras)
    zc = ZOConfig(optimizer="lozo", lozo_interval=5)
    running = make_method(zc, tr, RUN_SEED)
    for step in range(8):
        running.query(tr, direction_seeds(RUN_SEED, step, 1), step, EPS)
    fresh = make_method(zc, tr, RUN_SEED)
    seeds = direction_seeds(RUN_SEED, 7, 1)
    assert torch.equal(fresh.query(tr, seeds, 7, EPS).u, running.query(tr, seeds, 7, EPS).u)
    assert all(torch.equal(a, b) for a, b in zip(fresh.v_factors(tr, 5), running.v_factors(tr, 9)))
    assert not torch.equal(fresh.v_factors(tr, 10)[0], running.v_factors(tr, 9)[0])


# ---- zoft train: resume, replay, guard, forwards ----------------------------------------------------------

DATA = ["--task", "rotten_tomatoes", "--n-train", "32", "--n-dev", "8", "--n-test", "8", "--batch-size", "4",
        "--device", "cpu", "--no-zero-shot", "--lr", "0.02"]
RUN = DATA + ["--steps", "12", "--save-every", "3"]
FLAGS = {"zo-momentum": [], "zo-adam": ["--lr", "0.002"], "zo-sign": ["--lr", "0.002"], "fzoo": ["--directions", "4"],
         "hizoo": ["--hizoo-alpha", "0.01"], "lozo": ["--lozo-interval", "5"], "sparse-mezo": [], "conmezo": []}
# where the run is killed: between a step's log record and its update, or before a forward; LOZO mid-interval
KILL = {"zo-momentum": "update 7", "zo-adam": "update 4", "zo-sign": "forward 8", "fzoo": "update 10",
        "hizoo": "update 8", "lozo": "forward 7", "sparse-mezo": "update 5", "conmezo": "update 7"}
GUARDED = ["--batch-size", "1", "--steps", "50", "--save-every", "7", "--guard-threshold", "1.02", "--guard-strikes", "100"]
TIMEOUT = 120


@pytest.fixture(scope="module")
def model(root) -> str:
    return make_tiny("opt", str(root))


def start_marked(args: list, out: Path, stop: str) -> int:
    """Fork into `zoft ARGS`, appending "forward k" / "update k" to OUT.marks as a method step's forward and
    update begin, holding still at `stop` (the shape of tests/test_durability.py's driver)."""
    pid = os.fork()
    if pid:
        return pid
    code = 70
    try:
        import zoft.train.loop as T
        from zoft.cli import main as zoft_main

        count = {"forward": 0, "update": 0}

        def counted(phase, fn):
            def f(*a, **k):
                with open(f"{out}.marks", "a") as fh:
                    fh.write(f"{phase} {count[phase]}\n")
                end = time.time() + TIMEOUT
                while f"{phase} {count[phase]}" == stop and time.time() < end:
                    time.sleep(0.01)
                count[phase] += 1
                return fn(*a, **k)
            return f

        T.query_losses, T.update_method_ = counted("forward", T.query_losses), counted("update", T.update_method_)
        sys.stdout = sys.stderr = open(f"{out}.stderr", "w", buffering=1)
        torch.set_num_threads(1)
        zoft_main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def kill_at(args: list, out: Path, stop: str) -> None:
    pid, end = start_marked(args, out, stop), time.time() + TIMEOUT
    marks = Path(f"{out}.marks")
    while not (marks.exists() and stop in marks.read_text().splitlines()):
        done, status = os.waitpid(pid, os.WNOHANG)
        assert not done and time.time() < end, f"never reached {stop!r}: {Path(f'{out}.stderr').read_text()[-2000:]}"
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == -signal.SIGKILL


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def rows_of(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def assert_same_run(a: Path, b: Path) -> None:
    assert (a / "adapter" / "adapter_model.safetensors").read_bytes() == (b / "adapter" / "adapter_model.safetensors").read_bytes()
    assert load_file(str(a / "checkpoint" / "optimizer.safetensors")).keys() == load_file(str(b / "checkpoint" / "optimizer.safetensors")).keys()
    for k, v in load_file(str(a / "checkpoint" / "optimizer.safetensors")).items():
        assert torch.equal(v, load_file(str(b / "checkpoint" / "optimizer.safetensors"))[k]), k
    _, ra = steplog.read(str(a / "steps.jsonl"))
    _, rb = steplog.read(str(b / "steps.jsonl"))
    assert steplog.effective(ra) == steplog.effective(rb)
    assert [(r["step"], r["forwards"]) for r in rows_of(a)] == [(r["step"], r["forwards"]) for r in rows_of(b)]


def run_and_check(root, model, name: str, flags: list, stop: str, tag: str) -> Path:
    """The uninterrupted run; the same run SIGKILLed at `stop` and resumed (bitwise equal); its replay (bitwise
    equal). Returns the uninterrupted run."""
    base = ["train", "--model", model, "--optimizer", name, *FLAGS[name], *flags]
    a, b, rep = root / f"{tag}-{name}", root / f"{tag}-{name}-killed", root / f"{tag}-{name}-replay"
    code, err, _ = zoft(*base, "--output-dir", a)
    assert code == 0, err[-3000:]
    kill_at([*base, "--output-dir", b], b, stop)
    code, err, _ = zoft(*base, "--output-dir", b, "--resume")
    assert code == 0, err[-3000:]
    assert_same_run(a, b)
    code, err, _ = zoft("replay", "--model", model, "--log", a / "steps.jsonl", "--output-dir", rep)
    assert code == 0, err[-3000:]
    assert (rep / "adapter_model.safetensors").read_bytes() == (a / "adapter" / "adapter_model.safetensors").read_bytes()
    return a


@pytest.mark.parametrize("name", sorted(METHODS))
def test_kill_resume_and_replay_are_bitwise(root, model, name):
    """Each method's run, killed at a step and resumed, ends bitwise as the uninterrupted run (adapter, the method's
    state, the logged updates, the forward counts); `zoft replay` rebuilds the adapter bitwise. The run trains:
    finite losses, θ moved from its start, and 'forwards' grows by the method's rows a step."""
    a = run_and_check(root, model, name, RUN, KILL[name], "plain")
    rows = rows_of(a)
    assert all(math.isfinite(r["loss"]) for r in rows)
    per_step = {"fzoo": 5, "hizoo": 3}.get(name, 2)
    assert [r["forwards"] for r in rows] == [per_step * r["step"] for r in rows]
    trained = adapter(a)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in trained.items())  # B starts at 0


@pytest.mark.parametrize("name", ["zo-adam", "fzoo", "lozo"])
def test_prefix_mode_kill_resume_and_replay_are_bitwise(root, model, name):
    """The methods train a prefix too (--mode prefix): the run trains (finite losses, the method's rows counted,
    the prefix moved), a SIGKILL and --resume end bitwise as the uninterrupted run, and replay rebuilds it."""
    a = run_and_check(root, model, name, [*RUN, "--mode", "prefix"], KILL[name], "prefix")
    rows = rows_of(a)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [r["forwards"] for r in rows] == [{"fzoo": 5}.get(name, 2) * r["step"] for r in rows]
    from zoft.config import ModelConfig
    from zoft.session import attach, load_session

    s = load_session(ModelConfig(model=model, device="cpu"))
    attach(s, ZOConfig(mode="prefix"), seed=0)  # the run's starting prefix (seed 0's real activations)
    trained = adapter(a)["prompt_embeddings"]
    assert trained.shape == s.prefix.theta.shape and (trained - s.prefix.theta).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["zo-adam", "hizoo"])
def test_guard_undo_restores_the_state(root, model, name):
    """Many guard rejections: each undoes θ and the method's state exactly (resume and replay agree bitwise,
    the resume killed between two of them); every step's forward is counted, the rejected ones too."""
    a = run_and_check(root, model, name, DATA + GUARDED, "update 33", "guarded")
    _, records = steplog.read(str(a / "steps.jsonl"))
    assert sum("revert_to" in r for r in records) >= 2, "the guard never fired: the test proves nothing"
    rows = rows_of(a)
    assert len(rows) < rows[-1]["step"] and all(r["forwards"] == {"hizoo": 3}.get(name, 2) * r["step"] for r in rows)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_pipelined_equals_synchronous(root, model, name):
    """The pipelined loop (each update queued with the losses on the device, read one step later) ends bitwise
    as --no-pipeline (read, then update), with the guard rejecting steps on the way: θ, the method's state,
    the logged updates and reverts. Also the run's step log replays to the same adapter."""
    runs = []
    for flag in ([], ["--no-pipeline"]):
        out = root / f"pipe-{name}{flag and '-sync' or ''}"
        code, err, _ = zoft("train", "--model", model, "--optimizer", name, *FLAGS[name], *DATA, *GUARDED,
                            "--steps", "30", *flag, "--output-dir", out)
        assert code == 0, err[-3000:]
        runs.append(out)
    assert_same_run(*runs)
    _, records = steplog.read(str(runs[0] / "steps.jsonl"))
    _, sync_records = steplog.read(str(runs[1] / "steps.jsonl"))
    assert records == sync_records
    assert sum("revert_to" in r for r in records) >= 1, "the guard never fired: the reject path went untested"


def test_zo_sgd_forwards_count_rejected_steps(root, model):
    """zo-sgd's 'forwards' counts every step's rows, rejected ones included (the run goes on from the step after
    a rejected one): 2·steps, pipelined or not, though the guard rejects steps."""
    for pipe in ("--no-pipeline", "--pipeline"):
        out = root / f"sgd-forwards{pipe}"
        code, err, _ = zoft("train", "--model", model, *DATA, *GUARDED, pipe, "--output-dir", out)
        assert code == 0, err[-3000:]
        rows = rows_of(out)
        _, records = steplog.read(str(out / "steps.jsonl"))
        assert sum("revert_to" in r for r in records) >= 2
        assert len(rows) < rows[-1]["step"] and all(r["forwards"] == 2 * r["step"] for r in rows)  # rejected: no row


def test_resume_refuses_another_optimizer_or_setting(root, model):
    out = root / "resume-change"
    base = ["train", "--model", model, *DATA, "--steps", "4", "--output-dir", out]
    code, err, _ = zoft(*base, "--optimizer", "zo-adam")
    assert code == 0, err
    for change in (["--optimizer", "zo-momentum"], ["--optimizer", "zo-adam", "--beta2", "0.9"]):
        code, err, _ = zoft(*base, "--steps", "6", *change, "--resume")
        lines = [x for x in err.splitlines() if "zoft: error:" in x]
        assert code == 2 and len(lines) == 1 and "other settings" in lines[0], err[-2000:]


@pytest.mark.parametrize("flags,needle", [
    (["--optimizer", "zo-adamw"], "is not one of"),
    (["--optimizer", "zo-momentum", "--momentum", "1.0"], "--momentum must be in [0, 1)"),
    (["--optimizer", "zo-adam", "--beta2", "-0.1"], "--beta2 must be in [0, 1)"),
    (["--optimizer", "fzoo"], "--directions N >= 2"),
    (["--optimizer", "zo-sign", "--directions", "0"], "--directions and --batch-size must be at least 1"),
    (["--optimizer", "lozo", "--lozo-rank", "-2"], "--lozo-rank must be >= 1"),
    (["--optimizer", "lozo", "--lozo-interval", "0"], "--lozo-interval must be >= 1"),
    (["--optimizer", "sparse-mezo", "--sparsity", "1"], "--sparsity must be in [0, 1)"),
    (["--optimizer", "hizoo", "--hizoo-alpha", "0"], "--hizoo-alpha must be in (0, 1)"),
    (["--optimizer", "conmezo", "--cone-angle", "120"], "--cone-angle must be in (0, 90]"),
    (["--optimizer", "zo-adam", "--mode", "full"], "trains LoRA adapters or a prefix"),
    (["--optimizer", "hizoo", "--spread-directions"], "drop --spread-directions"),
    (["--optimizer", "zo-momentum", "--clip-grad", "1"], "drop --clip-grad"),
    (["--optimizer", "zo-adam", "--lozo-rank", "4"], "is a setting of --optimizer lozo"),
    (["--lozo-interval", "3"], "this run uses zo-sgd"),
])
def test_bad_optimizer_input_is_one_error_line(root, flags, needle):
    out = root / "never"
    code, err, _ = zoft("train", "--model", "nowhere", *flags, "--output-dir", out)
    lines = [x for x in err.splitlines() if "zoft: error:" in x]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err[-2000:]
    assert not out.exists()


def test_the_registry_is_the_configs_list():
    from zoft.config import ZO_METHODS

    assert sorted(METHODS) == sorted(ZO_METHODS)
    for cls in METHODS.values():
        doc = cls.__doc__ or ""
        assert "arXiv" in doc and "B/param" in doc and "Forwards" in doc, cls.__name__


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_trains_and_replays_bitwise_on_the_gpu(root, model, name):
    """On CUDA (the engine's graphs and fused paths, directions drawn on the device): each method's run is finite,
    counts its rows, moves B from zero, and `zoft replay --device cuda` rebuilds its adapter bitwise."""
    base = ["train", "--model", model, "--optimizer", name, *FLAGS[name], *RUN, "--device", "cuda"]
    a, rep = root / f"gpu-{name}", root / f"gpu-{name}-replay"
    code, err, _ = zoft(*base, "--output-dir", a)
    assert code == 0, err[-3000:]
    rows = rows_of(a)
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    per_step = {"fzoo": 5, "hizoo": 3}.get(name, 2)
    assert [r["forwards"] for r in rows] == [per_step * r["step"] for r in rows]
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter(a).items())
    code, err, _ = zoft("replay", "--model", model, "--log", a / "steps.jsonl", "--output-dir", rep, "--device", "cuda")
    assert code == 0, err[-3000:]
    assert (rep / "adapter_model.safetensors").read_bytes() == (a / "adapter" / "adapter_model.safetensors").read_bytes()
