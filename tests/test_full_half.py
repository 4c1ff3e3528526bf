"""Full mode in half precision: stochastic rounding of the update, and the Triton kernels of full rows.

The CPU tests pin the torch path's arithmetic; the `gpu` tests run the Triton kernels against it (the
same float32 arithmetic, z and the rounding draws taken from the kernels' own Philox streams).
"""

import pytest
import torch

from tests.test_zo import examples
from tests.tiny import make_tiny
from zoft.config import ModelConfig, ZOConfig
from zoft.session import attach, load_session, make_engine
from zoft.train.losses import row_losses
from zoft.zo.noise import param_seed, perturbed_pair, round_stochastic, rounding_draw, update_half_
from zoft.zo.perturbers import InPlacePerturber, estimate


def neighbours(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The two values of `dtype` around each float32 x (equal where x is representable)."""
    near = x.to(dtype)
    down = torch.nextafter(near, torch.full_like(near, -float("inf")))  # nextafter in dtype itself
    up = torch.nextafter(near, torch.full_like(near, float("inf")))
    lo = torch.where(near.float() > x, down, near)
    hi = torch.where(near.float() < x, up, near)
    return lo, hi


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour(dtype):
    """Over many draws the mean equals the exact value within its standard error, and every result is
    one of the two neighbours of the exact value, for values of both signs across magnitudes."""
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(64, generator=g) * torch.logspace(-3, 1, 64)
    exact = torch.cat([exact, -exact, torch.tensor([0.0, 1.0, -0.5])])  # representable values stay put
    n = 20_000
    acc = exact.repeat(n, 1)
    out = round_stochastic(acc.reshape(-1), dtype, rounding_draw(acc.numel(), dtype, g, "cpu")).view(n, -1)
    lo, hi = neighbours(exact, dtype)
    assert ((out == lo) | (out == hi)).all()
    mean = out.double().mean(0)
    se = (hi.double() - lo.double()) / 2 / n**0.5  # the largest standard error a two-point draw can have
    assert ((mean - exact.double()).abs() <= 4 * se + 1e-12).all()
    assert (out[:, -3:] == exact[-3:].to(dtype)).all()
    rtn = exact.to(dtype).double()  # round to nearest is biased for any value between neighbours
    assert ((rtn - exact.double()).abs() > 8 * se).sum() > 10


def test_half_update_is_a_pure_function_of_its_seeds():
    """update_half_ regenerates z and the rounding from their seeds: the same seeds give the same bits
    on a fresh copy (over several generator chunks), another rounding seed gives others."""
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(3 * (1 << 20) + 17, generator=g) * 0.05).to(torch.bfloat16)
    seeds, coefs = [param_seed(3, 0), param_seed(4, 0)], [-1e-5, 2e-5]
    a, b, c = w.clone(), w.clone(), w.clone()
    update_half_(a, seeds, coefs, 1.0, 77)
    update_half_(b, seeds, coefs, 1.0, 77)
    update_half_(c, seeds, coefs, 1.0, 78)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a != w).float().mean() > 0.01  # updates of ~0.1 ulp move a tenth of the weights or more


def test_round_to_nearest_drops_updates_that_stochastic_rounding_keeps():
    """MeZO's update (lr·g·z ~ 1e-6) is far below half an ulp of a bf16 weight near 0.05: round to
    nearest leaves nearly every weight where it was; stochastic rounding moves them by the update in
    expectation. This is why bf16 full mode rounds stochastically (docs/results.md measures it on a model)."""
    g = torch.Generator().manual_seed(2)
    w32 = torch.randn(200_000, generator=g) * 0.05
    w = w32.to(torch.bfloat16)
    coef, steps = -1e-6, 200
    sr, rtn = w.clone(), w.clone()
    exact = w.double()
    for k in range(steps):
        s = [param_seed(9, k)]
        update_half_(sr, s, [coef], 1.0, 1000 + k)
        z = torch.randn(w.numel(), generator=torch.Generator().manual_seed(s[0]))
        rtn = (rtn.float() + coef * z).to(torch.bfloat16)
        exact = exact + coef * z.double()
    moved_rtn = (rtn != w).float().mean().item()
    assert moved_rtn < 0.05  # round to nearest: the updates vanish (but for the few weights near 0)
    move = exact - w.double()  # where the exact updates took the weights
    along = lambda x: ((x.double() - w.double()) * move).sum().item() / move.pow(2).sum().item()
    assert along(rtn) < 0.2  # round to nearest kept (nearly) none of the movement
    assert 0.85 < along(sr) < 1.15, along(sr)  # stochastic rounding kept all of it, in expectation


def test_bf16_full_mode_keeps_one_copy_and_moves_weights(tmp_path):
    """--dtype bfloat16 --mode full: the trained tensors are the model's bf16 parameters themselves (no
    float32 copy), the rows path never modifies them during the step, and an update moves them."""
    s = load_session(ModelConfig(model=make_tiny("llama", str(tmp_path)), dtype="bfloat16"))
    attach(s, ZOConfig(mode="full"))
    params = {id(p) for p in s.model.parameters()}
    assert s.full_step == "rows" and all(id(t) in params and t.dtype == torch.bfloat16 for t in s.trainable.tensors)
    eng = make_engine(s)
    b = eng.batch(examples(1))
    before = [t.clone() for t in s.trainable.tensors]
    lp, lm, g = estimate(lambda rows: row_losses(eng.scores(b, rows), b, "candidate"), s.perturber, [5], 1e-3)
    assert all(torch.equal(a, t) for a, t in zip(before, s.trainable.tensors))
    assert torch.isfinite(g).all() and lp.item() != lm.item()
    from zoft.zo.update import sgd_update_

    sgd_update_(s.trainable, [5], [1.0], 1e-3, 0.0)
    moved = sum((a != t).sum().item() for a, t in zip(before, s.trainable.tensors))
    assert moved > 0.5 * sum(t.numel() for t in before)


def test_inplace_in_half_precision_keeps_a_float32_master(tmp_path, capsys):
    """The in-place passes would round half-precision weights three times a step: the transformers
    fallback (in place only) keeps a float32 master and says so."""
    s = load_session(ModelConfig(model=make_tiny("opt", str(tmp_path)), dtype="bfloat16", engine="hf"))
    attach(s, ZOConfig(mode="full"))
    assert isinstance(s.perturber, InPlacePerturber)
    assert all(t.dtype == torch.float32 for t in s.trainable.tensors)
    assert "float32 master" in capsys.readouterr().err


# ---- the Triton kernels (CUDA) -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_perturbed_pair_kernels_equal_the_torch_arithmetic(dtype):
    from zoft.zo.kernels import perturb_triton as pt

    g = torch.Generator("cuda").manual_seed(0)
    w = (torch.randn(300, 257, device="cuda", generator=g) * 0.05).to(dtype)
    seed = param_seed(11, 4)
    seed_t = torch.tensor([seed], device="cuda")
    z = pt.randn_triton(w.numel(), seed, "cuda").view_as(w)
    p, m = pt.perturbed_pair_triton(w, seed_t, 1e-3)
    rp, rm = perturbed_pair(w, z, 1e-3)
    # a fused multiply-add may round once where torch rounds twice: one ulp of the operands' size
    scale = (w.float().abs() + 1e-3 * z.abs()) * torch.finfo(dtype).eps
    for got, want in ((p, rp), (m, rm)):
        assert ((got.float() - want.float()).abs() <= scale).all() and (got == want).float().mean() > 0.9
    idx = torch.tensor([5, 0, 299, 5, 17], device="cuda")
    rows_p, rows_m = pt.perturbed_rows_triton(w, idx, seed_t, 1e-3)
    assert torch.equal(rows_p, p[idx]) and torch.equal(rows_m, m[idx])  # z indexed as w's elements


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sr_update_kernel_is_unbiased_and_deterministic(dtype):
    from zoft.zo.kernels import perturb_triton as pt

    n = 1 << 22
    base = torch.full((n,), 0.0312345, device="cuda").to(dtype)
    seeds = torch.tensor([param_seed(1, 0)], device="cuda")
    coefs = torch.tensor([1e-6], device="cuda")
    a, b = base.clone(), base.clone()
    pt.update_sr_triton_(a, seeds, coefs, 1.0, 5)
    pt.update_sr_triton_(b, seeds, coefs, 1.0, 5)
    assert torch.equal(a, b)
    exact = base.double() + 1e-6 * pt.randn_triton(n, int(seeds[0]), "cuda").double()
    lo, hi = neighbours(exact.float().cpu(), dtype)
    assert ((a.cpu() == lo) | (a.cpu() == hi)).all()
    err = (a.double() - exact).mean().item()
    se = (hi.double() - lo.double()).max().item() / 2 / n**0.5
    assert abs(err) < 4 * se
    assert (a != base).float().mean() > 0.001  # round to nearest would move none of them


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_full_rows_on_cuda_equal_inplace(tmp_path, backend):
    """float32 full mode on CUDA, every parameter: the rows (Triton or torch z) give the in-place passes'
    L₊, L₋ with the same z, and a CUDA graph replay of the rows (Triton: seeds in a device table) gives the
    eager losses for a new step's seeds."""
    s = load_session(ModelConfig(model=make_tiny("opt", str(tmp_path)), device="cuda"))
    attach(s, ZOConfig(mode="full", z_backend=backend))
    assert s.trainable.z_backend == backend
    eng = make_engine(s)
    b = eng.batch(examples(1))
    fn = lambda rows: row_losses(eng.scores(b, rows, graph=True), b, "candidate")
    for step in range(4):  # the graph is recorded at the second meeting, replayed after
        seeds = [param_seed(step, 1), param_seed(step, 2)]
        lp, lm, _ = estimate(fn, s.perturber, seeds, 1e-3)
        lp2, lm2, _ = estimate(lambda r: row_losses(eng.scores(b, r), b, "candidate"), InPlacePerturber(s.trainable),
                               seeds, 1e-3)
        torch.testing.assert_close(lp, lp2, rtol=0, atol=2e-5)
        torch.testing.assert_close(lm, lm2, rtol=0, atol=2e-5)
    if backend == "triton":
        assert eng.graphs.replays > 0


@pytest.mark.gpu
def test_one_launch_update_equals_the_per_tensor_kernels():
    """zoft.zo's Triton update (one launch per dtype, each program finding its tensor by binary search)
    gives the per-tensor kernels' bits, for tensors of every size (empty, smaller than a block, several)."""
    from zoft.zo.kernels import perturb_triton as pt
    from zoft.zo.trainable import Trainable
    from zoft.zo.update import rounding_seed, sgd_update_

    g = torch.Generator("cuda").manual_seed(0)
    shapes = [(7,), (0,), (1024,), (3, 1000), (2049,), (64, 64)]
    dts = [torch.bfloat16, torch.bfloat16, torch.float16, torch.bfloat16, torch.float32, torch.float16]
    ts = [(torch.randn(s, device="cuda", generator=g) * 0.05).to(d) for s, d in zip(shapes, dts)]
    decay = [True, False, True, False, True, True]
    tr = Trainable([f"t{i}" for i in range(len(ts))], [t.clone() for t in ts], decay, z_backend="triton")
    seeds, grads, lr, wd = [param_seed(1, 2), param_seed(3, 4)], [0.7, -1.3], 1e-3, 0.1
    sgd_update_(tr, seeds, grads, lr, wd)
    for i, (t, got) in enumerate(zip(ts, tr.tensors)):
        want = t.clone()
        d = 1 - lr * wd if decay[i] else 1.0
        coefs = [-lr * gj / 2 for gj in grads]
        if want.dtype == torch.float32:
            pt.add_noise_multi_triton_(want, [param_seed(s, i) for s in seeds], coefs, d)
        elif want.numel():
            pt.update_sr_triton_(want, torch.tensor([param_seed(s, i) for s in seeds], device="cuda"),
                                 torch.tensor(coefs, device="cuda"), d, rounding_seed(seeds, i))
        assert torch.equal(got, want), i


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_guard_undo_in_full_mode_is_exactly_one_update(tmp_path, dtype):
    """Full mode keeps no copy of θ: the guard's undo reloads the checkpoint and redoes the logged updates
    after it but the last (or, when the checkpoint already holds that update, starts from the base
    weights), and lands bitwise on θ before the last update, stochastic rounding included."""
    from zoft.train import steplog
    from zoft.train.checkpoint import save_checkpoint, undo_last
    from zoft.zo.trainable import direction_seeds
    from zoft.zo.update import sgd_update_

    s = load_session(ModelConfig(model=make_tiny("llama", str(tmp_path)), dtype=dtype))
    attach(s, ZOConfig(mode="full"))
    eps, wd = 1e-3, 0.1
    run = tmp_path / "run"
    run.mkdir()
    log = steplog.StepLog(str(run / "steps.jsonl"), {"note": "test"}, 1, fresh=True)
    ckpt = str(run / "checkpoint")
    snaps = [[t.clone() for t in s.trainable.tensors]]
    for k in range(4):
        seeds, grads = direction_seeds(0, k, 2), [0.3 - 0.2 * k, -0.7]
        log.write({"step": k, "seeds": seeds, "grads": grads, "lr": 1e-3, "loss": 1.0})
        sgd_update_(s.trainable, seeds, grads, 1e-3, wd)
        snaps.append([t.clone() for t in s.trainable.tensors])
        if k == 1:
            save_checkpoint(s, ckpt, {"next_step": 2, "applied": 2})
    log.sync()
    assert undo_last(s, ckpt, None, 4, eps, wd) == 3  # from the checkpoint at 2: redo update 3
    assert all(torch.equal(a, b) for a, b in zip(s.trainable.tensors, snaps[3]))
    save_checkpoint(s, ckpt, {"next_step": 3, "applied": 3})  # now the checkpoint holds the suspect update
    assert undo_last(s, ckpt, None, 3, eps, wd) == 2  # from the base weights: redo updates 1 and 2
    assert all(torch.equal(a, b) for a, b in zip(s.trainable.tensors, snaps[2]))
    assert not all(torch.equal(a, b) for a, b in zip(snaps[2], snaps[3]))  # the undo undid something


def test_update_from_g_on_the_device_equals_the_host_floats():
    """The pipelined loop hands sgd_update_ g as a float64 tensor it never reads; the synchronous loop and a
    replay from steps.jsonl hand it host floats. Both must give the same bits in every dtype full mode
    trains (stochastically rounded bf16/fp16, float32, a float64 master), with decay and three directions,
    and the float32/float64 update must stay the arithmetic it always was (θ·d, then θ += c_j·z_j with
    c_j = −lr·g_j/n rounded to θ's dtype: add_ with alpha). A non-finite g changes nothing."""
    from zoft.zo.noise import noise
    from zoft.zo.trainable import Trainable
    from zoft.zo.update import sgd_update_

    g = torch.Generator().manual_seed(3)
    dts = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.bfloat16]
    shapes = [(33, 17), (1000,), (7, 300), (2, 501), (1 << 20) + 3]  # the last spans two of the torch path's chunks
    ts = [(torch.randn(s, generator=g) * 0.05).to(d) for s, d in zip(shapes, dts)]
    decay = [True, False, True, True, False]
    seeds, grads, lr, wd = [param_seed(7, 1), param_seed(7, 2), param_seed(7, 3)], [0.731, -1.29, 0.0417], 3e-3, 0.1
    make = lambda: Trainable([f"t{i}" for i in range(len(ts))], [t.clone() for t in ts], decay)
    host, dev, bad = make(), make(), make()
    sgd_update_(host, seeds, grads, lr, wd)
    sgd_update_(dev, seeds, torch.tensor(grads, dtype=torch.float64), lr, wd)
    sgd_update_(bad, seeds, torch.tensor([grads[0], float("nan"), grads[2]], dtype=torch.float64), lr, wd)
    for i, t in enumerate(ts):
        assert torch.equal(host.tensors[i], dev.tensors[i]), dts[i]
        assert (host.tensors[i] != t).float().mean() > 0.3, dts[i]  # it moved
        assert torch.equal(bad.tensors[i], t), dts[i]
        if t.dtype in (torch.float32, torch.float64):
            want = t.clone().mul_(1 - lr * wd if decay[i] else 1.0)
            for s, gj in zip(seeds, grads):
                want.add_(noise(want, param_seed(s, i)).to(t.dtype), alpha=-lr * gj / 3)
            assert torch.equal(host.tensors[i], want), dts[i]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_update_from_g_on_the_gpu_equals_the_host_floats_and_never_waits(backend):
    """On CUDA, as on the CPU: g still on the device gives the host floats' bits (Triton: one launch per
    dtype; torch: addcmul_), and a non-finite g changes nothing. Triton's update, once its plan is made,
    queues without a single synchronizing call (torch's sync debug mode would raise on one)."""
    from zoft.zo.trainable import Trainable
    from zoft.zo.update import sgd_update_

    g = torch.Generator("cuda").manual_seed(0)
    dts = [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16]
    ts = [(torch.randn(s, device="cuda", generator=g) * 0.05).to(d) for s, d in zip([(7,), (3, 1000), (2049,), (64, 64)], dts)]
    decay = [True, False, True, True]
    make = lambda: Trainable([f"t{i}" for i in range(len(ts))], [t.clone() for t in ts], decay, z_backend=backend)
    seeds, grads, lr, wd = [param_seed(1, 2), param_seed(3, 4), param_seed(5, 6)], [0.7, -1.3, 0.11], 1e-3, 0.1
    host, dev = make(), make()
    sgd_update_(host, seeds, grads, lr, wd)
    gt = torch.tensor(grads, dtype=torch.float64, device="cuda")
    sgd_update_(dev, seeds, gt, lr, wd)
    after = [t.clone() for t in dev.tensors]
    torch.cuda.synchronize()
    if backend == "triton":  # dev's plans exist now: its next update must not wait for the GPU
        torch.cuda.set_sync_debug_mode("error")
    try:
        sgd_update_(dev, seeds, gt * float("nan"), lr, wd)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for i, t in enumerate(ts):
        assert torch.equal(host.tensors[i], after[i]), i
        assert not torch.equal(host.tensors[i], t), i
        assert torch.equal(dev.tensors[i], after[i]), i
