"""Optional fast kernels, each behind the same call as its PyTorch fallback (STYLE.md, habit 8).

``AVAILABLE`` is decided once, at import: True when Triton imports and a CUDA device is present, unless
the environment sets ``ZOFT_DISABLE_TRITON=1`` (tests and comparisons force the fallback with it).
Importing this package never raises on a machine without Triton or CUDA.

* ``zoft.zo.kernels.perturb_triton``: x += scale·z and the fused ZO update, z from Philox(seed, index).
"""

from __future__ import annotations

import os

import torch


def _detect() -> bool:
    if os.environ.get("ZOFT_DISABLE_TRITON", "") not in ("", "0"):
        return False
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or a broken install: the torch path still works
        return False
    return True


AVAILABLE: bool = _detect()
