"""Compile the Triton update kernels for an H100/H200 (sm_90) without a GPU and write their PTX, so that a
refactor of a kernel can be checked on any machine: the same instructions before and after it mean the
same arithmetic. Needs triton and torch only (a CPU wheel will do):

    python scripts/triton_ptx.py OUT_DIR          # one OUT_DIR/<kernel>.ptx per kernel variant
    diff -r BEFORE_DIR AFTER_DIR                  # debug labels and line tables are stripped

It checks compilation and the generated code, not results: tests/ -m gpu runs the kernels.
"""

import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from zoft.zo.kernels import perturb_triton as pt  # noqa: E402

MANY = {"ptrs_ptr": "*i64", "map_ptr": "*i32", "starts_ptr": "*i64", "numels_ptr": "*i64", "ints_ptr": "*i64",
        "floats_ptr": "*fp32", "n_tensors": "i32", "n_dirs": "i32", "ELT": "constexpr", "HALF": "constexpr",
        "SUB": "constexpr", "BLOCK": "constexpr"}
SR = {"x_ptr": None, "n_elements": "i64", "seeds_ptr": "*i64", "coefs_ptr": "*fp32", "n_dirs": "i32", "decay": "fp32",
      "sr_seed": "i64", "HALF": "constexpr", "BLOCK": "constexpr"}


def instructions(ptx: str) -> str:
    """The PTX without what moves when source lines move: comments, .loc/.file, debug sections, labels."""
    ptx = ptx.split(".section")[0]
    lines = (re.sub(r"//.*", "", line).strip() for line in ptx.splitlines())
    return "\n".join(x for x in lines if x and not x.startswith((".loc", ".file")) and not re.fullmatch(r"\$L__tmp\d+:", x))


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    target = GPUTarget("cuda", 90, 32)
    variants = [(pt._update_many_kernel, MANY, {"ELT": elt, "HALF": half, "SUB": pt.SUB, "BLOCK": pt.BLOCK},
                 f"update_many_{name}") for half, (name, elt) in enumerate([("fp32", tl.float32), ("bf16", tl.bfloat16),
                                                                           ("fp16", tl.float16)])]
    variants += [(pt._update_sr_kernel, SR | {"x_ptr": f"*{name}"}, {"HALF": half, "BLOCK": pt.BLOCK}, f"update_sr_{name}")
                 for half, name in ((1, "bf16"), (2, "fp16"))]
    for fn, sig, consts, name in variants:
        k = triton.compile(triton.compiler.ASTSource(fn, sig, consts), target=target)
        with open(os.path.join(out, name + ".ptx"), "w") as f:
            f.write(instructions(k.asm["ptx"]) + "\n")
        print(f"{name}: compiled for sm_90")


if __name__ == "__main__":
    main(sys.argv[1])
