"""The Triton perturbation kernels against their PyTorch references, and the fallback switch.

The `gpu` tests skip where no CUDA device exists (tests/conftest.py). Their bodies also run on CPU under
Triton's interpreter (TRITON_INTERPRET=1, triton installed), by calling them directly: DEVICE follows.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from zoft.zo.kernels import perturb_triton as pt
from zoft.zo.noise import param_seed

DEVICE = "cpu" if pt.INTERPRET else "cuda"
N_STATS = 1 << 22  # 4M elements: the mean's standard error is 5e-4


def _available_in_fresh_process(env_extra: dict) -> str:
    env = {**os.environ, **env_extra}
    code = "import zoft.zo.kernels as k, zoft.zo.kernels.perturb_triton; print(k.AVAILABLE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_available_flag_and_disable_switch():
    """Importing never raises; AVAILABLE needs triton and CUDA; ZOFT_DISABLE_TRITON=1 forces the fallback."""
    expected = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
    env = {"ZOFT_DISABLE_TRITON": ""}
    assert _available_in_fresh_process(env) == str(expected)
    assert _available_in_fresh_process({"ZOFT_DISABLE_TRITON": "1"}) == "False"


@pytest.mark.skipif(pt.INTERPRET, reason="the interpreter accepts CPU tensors")
def test_refuses_cpu_tensors():
    with pytest.raises(RuntimeError if pt.triton is None else ValueError):
        pt.add_noise_triton_(torch.zeros(8), 1, 1.0)


def ulp(x: torch.Tensor) -> float:
    """Spacing of floating-point numbers at max|x| in x's dtype."""
    m = x.abs().max().float().item()
    return torch.finfo(x.dtype).eps * 2.0 ** torch.tensor(m).log2().floor().item()


@pytest.mark.gpu
def test_same_seed_same_z_bitwise_and_seeds_differ():
    a = pt.randn_triton(100_003, 1234, DEVICE)
    b = pt.randn_triton(100_003, 1234, DEVICE)
    c = pt.randn_triton(100_003, 1235, DEVICE)
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.99
    # z[i] depends on (seed, i) only: a prefix is the same stream, whatever the tensor's length
    assert torch.equal(pt.randn_triton(1000, 1234, DEVICE), a[:1000])
    # large seeds (param_seed gives 63 bits) are accepted and deterministic
    s = param_seed(7, 3)
    assert s >= 1 << 32
    assert torch.equal(pt.randn_triton(4096, s, DEVICE), pt.randn_triton(4096, s, DEVICE))


@pytest.mark.gpu
def test_z_is_standard_normal():
    z = pt.randn_triton(N_STATS, param_seed(0, 0), DEVICE).double()
    assert abs(z.mean().item()) < 3e-3  # 6 standard errors
    assert abs(z.std().item() - 1) < 3e-3
    assert abs(((z**4).mean() / z.var() ** 2).item() - 3) < 0.05  # kurtosis: normal, not uniform
    # neighbouring parameter seeds give uncorrelated streams
    z2 = pt.randn_triton(N_STATS, param_seed(0, 1), DEVICE).double()
    assert abs((z * z2).mean().item()) < 3e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plus_minus_restore_returns_start(dtype):
    """+εz, −2εz, +εz: three roundings, so at most a few ulp of max|x| away from the start."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1 << 20, generator=g).to(dtype).to(DEVICE)
    x, seed, eps = x0.clone(), param_seed(11, 5), 1e-3
    pt.add_noise_triton_(x, seed, eps)
    if dtype == torch.float32:
        assert not torch.equal(x, x0)
    pt.add_noise_triton_(x, seed, -2 * eps)
    pt.add_noise_triton_(x, seed, eps)
    err = (x.float() - x0.float()).abs().max().item()
    assert err <= 4 * ulp(x0), (err, ulp(x0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_reference_math(dtype):
    """Each kernel equals its torch reference given the z it generates (kernel on zeros, scale 1)."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(300_001, generator=g).to(dtype).to(DEVICE)
    seeds = [param_seed(3, i) for i in range(3)]
    zs = [pt.randn_triton(x0.numel(), s, DEVICE) for s in seeds]
    tol = 2 * ulp(x0)  # one rounding each, plus a possible fused multiply-add on the kernel side

    def check(run, ref, tol=tol):
        a, b = x0.clone(), x0.clone()
        run(a)
        ref(b)
        assert (a.float() - b.float()).abs().max().item() <= tol

    check(lambda t: pt.add_noise_triton_(t, seeds[0], 0.37), lambda t: pt.add_noise_reference_(t, zs[0], 0.37))
    lr, gr, wd = 1e-2, 3.5, 0.1
    check(lambda t: pt.update_triton_(t, seeds[0], lr, gr, wd), lambda t: pt.update_reference_(t, zs[0], lr, gr, wd))
    coefs, decay = [-0.3, 0.2, 0.05], 0.999
    check(lambda t: pt.add_noise_multi_triton_(t, seeds, coefs, decay),
          lambda t: pt.add_noise_multi_reference_(t, zs, coefs, decay))

    def unfused(t):  # zoft.zo.sgd_update_'s torch math: decay pass, then t += (−lr·g)·z in t's dtype
        t.mul_(1 - lr * wd)
        t.add_(zs[0].to(t.dtype), alpha=-lr * gr)

    check(lambda t: pt.update_triton_(t, seeds[0], lr, gr, wd), unfused, tol=3 * ulp(x0))
    # one direction through the multi kernel is the single kernel
    check(lambda t: pt.add_noise_multi_triton_(t, seeds[:1], [0.37]), lambda t: pt.add_noise_triton_(t, seeds[0], 0.37))


@pytest.mark.gpu
def test_shapes_and_refusals():
    x = torch.zeros(7, 13, device=DEVICE)
    pt.add_noise_triton_(x, 5, 1.0)
    assert torch.equal(x.view(-1), pt.randn_triton(91, 5, DEVICE))
    pt.add_noise_triton_(torch.zeros(0, device=DEVICE), 5, 1.0)  # empty: a no-op
    with pytest.raises(ValueError):
        pt.add_noise_triton_(torch.zeros(8, 8, device=DEVICE).t(), 5, 1.0)
    with pytest.raises(ValueError):
        pt.add_noise_triton_(torch.zeros(8, dtype=torch.float64, device=DEVICE), 5, 1.0)
    with pytest.raises(ValueError):
        pt.add_noise_triton_(torch.zeros(8, device=DEVICE), -1, 1.0)
