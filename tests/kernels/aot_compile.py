"""Compile every spoxl Triton kernel ahead of time for NVIDIA GPUs, without a GPU.

Triton's wheel ships ptxas, so `triton.compile` can lower a kernel to PTX and a cubin for a named
target with no driver present. This catches what the interpreter cannot: kernels that only
type-check in numpy, ops the GPU backend rejects, constexpr branches the tests never take.

Run in a process WITHOUT TRITON_INTERPRET (the interpreter swaps the JIT functions out):
    env -u TRITON_INTERPRET python tests/kernels/aot_compile.py [--arch 80 90]
Prints one line per compiled variant; exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the kernels being compiled")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from spoxl.kernels import _triton_kernels as kernels  # noqa: E402
from spoxl.kernels.losses import LOSSES  # noqa: E402

# Pointers that always hold the accumulation dtype (partials, per-sample coefficients, the mean).
ACC_POINTERS = {
    "part_ptr", "coef_a_ptr", "coef_c_ptr", "coef_ptr", "mean_ptr", "sqrt_1m_a_ptr", "sqrt_a_ptr",
    "x0_coef_ptr", "eps_coef_ptr", "std_ptr", "g_ptr", "g_ref_ptr", "loss_ptr", "logp_ptr", "ref_logp_ptr", "std_out_ptr",
}  # fmt: skip
FP64_POINTERS = {"param_ptr"}
FP32_POINTERS = {"met_ptr"}
FLOAT_ARGS = {"sqrt_1m_a", "sqrt_a", "x0_coef", "eps_coef", "std_value"}  # pool_step's scalar coefficients
FLAGS = {
    "sqerr_partials_kernel": ("HAS_L", "HAS_REF"),
    "scaled_diff_kernel": ("HAS_SECOND", "HAS_G"),
    "pool_step_kernel": ("HAS_NOISE", "SCALAR", "WITH_LOGP"),
    "pool_logprob_partials_kernel": ("HAS_REF",),
    "pool_logprob_backward_kernel": ("HAS_REF", "HAS_G", "HAS_G_REF"),
    "logprob_head_kernel": ("HAS_REF",),
}
KERNELS = [
    "sqerr_partials_kernel",
    "logratio_partials_kernel",
    "scaled_diff_kernel",
    "pool_logprob_partials_kernel",
    "logprob_head_kernel",
    "pool_logprob_backward_kernel",
    "pool_step_kernel",
    "loss_head_kernel",
]
# (data dtype, accumulation dtype) as the wrappers launch them.
DTYPES = [("fp32", tl.float32), ("bf16", tl.float32), ("fp16", tl.float32), ("fp64", tl.float64)]


def signature(fn, data: str, acc) -> dict:
    acc_name = "fp64" if acc == tl.float64 else "fp32"
    sig = {}
    for name in fn.arg_names:
        if name.isupper():  # constexpr parameters are upper case in these kernels
            sig[name] = "constexpr"
        elif name in FP64_POINTERS:
            sig[name] = "*fp64"
        elif name in FP32_POINTERS:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{acc_name}" if name in ACC_POINTERS else f"*{data}"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i64" if name == "seed" else "i32"
    # B, N, NCHUNK and K are runtime ints despite being upper case.
    for name in ("B", "N", "NCHUNK", "K"):
        if name in sig:
            sig[name] = "i32"
    return sig


def variants(name):
    if name == "loss_head_kernel":  # every registered loss's every head; log-ratio losses reduce 2 values, MSEs 4
        for module in LOSSES.values():
            logratio = module.REDUCTION == "logratio"
            for head in module.triton_heads().values():
                yield {"HEAD": head, "HAS_STD": logratio, "S": 2 if logratio else 4, "BLOCK_B": 8, "BLOCK_C": 64}
        return
    flags = FLAGS.get(name, ())
    for values in itertools.product((False, True), repeat=len(flags)):
        yield dict(zip(flags, values))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", nargs="*", type=int, default=[90])
    parser.add_argument("--block", type=int, default=2048)
    args = parser.parse_args(argv)
    count = 0
    start = time.time()
    for arch, name, (data, acc) in itertools.product(args.arch, KERNELS, DTYPES):
        fn = getattr(kernels, name)
        heads = ("loss_head_kernel", "logprob_head_kernel")
        if name in heads and data in ("bf16", "fp16"):
            continue  # reads only accumulation-dtype partials: fp32 and fp64 cover it
        for flags in variants(name):
            if name == "loss_head_kernel":
                constexprs = dict(flags)
            elif name == "logprob_head_kernel":
                constexprs = {**flags, "BLOCK_C": 32, "BLOCK_K": 4}
            else:
                constexprs = {**flags, "ACC": acc, "BLOCK": args.block}
            src = ASTSource(fn=fn, signature=signature(fn, data, acc), constexprs=constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 8})
            assert compiled.asm.get("cubin"), f"{name}: no cubin"
            count += 1
            shown = {k: getattr(v, "__name__", v) for k, v in flags.items()}
            print(f"ok sm_{arch} {name} {data} {shown}", flush=True)
    print(f"compiled {count} kernel variants in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
