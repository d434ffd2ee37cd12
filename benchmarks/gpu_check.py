"""One-shot GPU check of spoxl.kernels: correctness, host syncs, launches, speed, and one real-size
SDXL UNet step. Written to be run unattended in the few minutes a lent GPU gives (under 5 minutes
on one H100/H200):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py            # on a GPU
    python benchmarks/gpu_check.py --cpu                          # CPU mode (what CI runs)

Sections (each row of the CSV names its section, op, case, provider and PASS/FAIL/INFO):
  correctness  every op's Triton kernels against the fp64 oracle (the torch reference run on the
               inputs upcast to fp64; the reference itself is held to independent oracles in
               tests/kernels): fp32, mixed bf16/fp32 (policy tensors bf16, the rest fp32, as
               training passes them), fp16; SDXL latents 8x4x128x128, the NCP feature shape
               8x1280x32x32, B = 1, odd sizes; pools k = 1, 2, 4; loss, metrics and gradients.
               pool_step's Philox noise: reproducible per seed (62-bit seeds too), different across
               seeds, standard normal.
  syncs        host syncs during fwd+bwd with metrics (torch.cuda.set_sync_debug_mode on CUDA;
               on CPU the ops that would sync: .item(), nonzero, tensor literals), and Triton
               recompiles over 50 sampler-style seeds.
  launches     device launches per op, fwd+bwd with metrics: Triton kernels plus torch ops (views
               and metadata free), against the budget of 6 (issue 17; INFO until it is met).
  speed        median wall time (CUDA events) and summed kernel time (torch.profiler) per op,
               forward and full (fwd+bwd), metrics on and off, for eager torch, torch.compile and
               Triton; the bandwidth of the ideal traffic against a measured device-to-device copy.
               Goals (PASS/FAIL): Triton >= 3x eager and >= 1.5x torch.compile on full with
               metrics; >= 70% of the copy's bandwidth for ncp_loss at the NCP shape.
  unet         one forward+backward of the real-size SDXL UNet (random weights, bf16, 1024 px):
               seconds and TFLOP/s against 3 x 6.76 TFLOP (needs diffusers; skipped without).

CPU mode (automatic without CUDA, or --cpu): the same code on tiny shapes, Triton under the
interpreter (TRITON_INTERPRET=1, set here before the kernels are imported); torch.compile and
the UNet step are skipped; timings there say nothing about speed and are marked INFO. Writes
benchmarks/results/gpu_check_<device>.csv (CPU mode: gpu_check_cpu.csv unless --out-dir).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = ["section", "op", "case", "provider", "metric", "value", "goal", "status", "device"]
LAUNCH_BUDGET = 6
SPEEDUP_EAGER, SPEEDUP_COMPILE, BANDWIDTH_FRACTION = 3.0, 1.5, 0.7
# Largest error relative to the oracle's largest magnitude, by the dtype the value is stored in.
GRAD_TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 2e-2}
# Losses and metrics accumulate in fp32 from the same (rounded) inputs as the fp64 oracle; metrics
# that are differences of near-equal sums (SPO's log-ratios) carry fp32 rounding of the terms, so
# an absolute floor at the loss's scale (O(1)) as well as a relative bound.
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-6

GPU_SHAPES = {"sdxl": (8, 4, 128, 128), "b1": (1, 4, 128, 128), "odd": (3, 4, 37, 53)}
GPU_NCP_SHAPE = (8, 1280, 32, 32)
CPU_SHAPES = {"tiny": (2, 4, 8, 8), "b1": (1, 4, 8, 8), "odd": (3, 3, 5, 7)}
CPU_NCP_SHAPE = (2, 16, 4, 4)
DTYPES = ("fp32", "mixed_bf16", "fp16")
POOL_KS = (1, 2, 4)


class Report:
    """The rows so far. With a path, the CSV is rewritten after every row, so a run cut off by a
    device lease's time limit still leaves everything it measured."""

    def __init__(self, device_name: str, path: Path | None = None):
        self.rows: list[dict] = []
        self.device = device_name
        self.path = path

    def add(self, section, op, case, provider, metric, value, goal="", status="INFO"):
        self.rows.append({"section": section, "op": op, "case": case, "provider": provider, "metric": metric,
                          "value": value if isinstance(value, str) else f"{value:.6g}", "goal": goal,
                          "status": status, "device": self.device})  # fmt: skip
        if status == "FAIL" or section != "correctness":
            print(f"[{section}] {op} {case} {provider} {metric} = {self.rows[-1]['value']} {goal} {status}", flush=True)
        if self.path is not None:
            self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.path)

    def failures(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "FAIL"]


# ---------------------------------------------------------------------------------------------
# Inputs: (positional args, keyword args, indices of the differentiable args) per op


def make_inputs(op: str, shape, dtype_name: str, device, k: int = 2, seed: int = 0):
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    policy = {"fp32": torch.float32, "mixed_bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    other = torch.float16 if dtype_name == "fp16" else torch.float32

    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device)

    if op == "spo_loss":
        x_w, x_l = randn(*shape), randn(*shape)
        m_w, m_l = x_w - 0.5 * randn(*shape), x_l - 0.5 * randn(*shape)
        r_w, r_l = m_w + 0.015 * randn(*shape), m_l + 0.015 * randn(*shape)
        std = torch.full((shape[0],), 0.5, device=device)
        args = [x_w.to(other), x_l.to(other), m_w.to(policy), m_l.to(policy), r_w.to(other), r_l.to(other), std]
        return args, {"beta": 10.0, "clip": 0.1}, (2, 3)
    if op in ("diffusion_dpo_loss", "ncp_loss_dpo", "ncp_loss_cpo", "ncp_loss_sft"):
        t_w, t_l = randn(*shape), randn(*shape)
        preds = [t_w + randn(*shape, scale=0.02), t_l + randn(*shape, scale=0.02)]
        refs = [t_w + randn(*shape, scale=0.02), t_l + randn(*shape, scale=0.02)]
        args = [p.to(policy) for p in preds] + [r.to(other) for r in refs] + [t_w.to(other), t_l.to(other)]
        if op == "diffusion_dpo_loss":
            return args, {"beta": 5000.0}, (0, 1)
        kind = op.rsplit("_", 1)[1]
        return args, {"beta": 2500.0, "kind": kind}, (0, 1)
    if op == "mapo_loss":
        t_w, t_l = randn(*shape), randn(*shape)
        preds = [t_w + randn(*shape, scale=0.05), t_l + randn(*shape, scale=0.05)]
        args = [p.to(policy) for p in preds] + [t_w.to(other), t_l.to(other)]
        return args, {"beta": 0.1, "snr": 0.5, "num_train_timesteps": 1000}, (0, 1)
    if op == "transition_logprob":
        mean = randn(*shape)
        x_prev = mean + 0.5 * randn(*shape)
        return [x_prev.to(other), mean.to(policy), torch.full((shape[0],), 0.5, device=device)], {}, (1,)
    if op == "pool_logprobs":
        mean = randn(*shape)
        samples = mean.unsqueeze(1) + 0.5 * randn(shape[0], k, *shape[1:])
        ref = mean + 0.01 * randn(*shape)
        return [samples.to(other), mean.to(policy), ref.to(other), torch.full((shape[0],), 0.5, device=device)], {}, (1,)
    if op == "pool_step":
        x_t, eps = randn(*shape), randn(*shape)
        noise = randn(shape[0], k, *shape[1:])
        return [x_t.to(policy), eps.to(policy), 0.3, 0.35, 1.0, k], {"noise": noise, "return_logprob": True}, ()
    raise ValueError(op)


LOSS_OPS = ("spo_loss", "diffusion_dpo_loss", "mapo_loss", "ncp_loss_dpo", "ncp_loss_cpo", "ncp_loss_sft")
ALL_OPS = (*LOSS_OPS, "transition_logprob", "pool_logprobs", "pool_step")


def op_function(module, op: str):
    """The callable for `op` on a backend module (ncp variants share ncp_loss)."""
    return getattr(module, "ncp_loss" if op.startswith("ncp_loss") else op)


def prepare(fn, op, args, kwargs, grad_idx, metrics: bool = True, backward: bool = True):
    """A closure that runs the op once on its own leaves, as training calls it (forward, then
    backward with upstream gradients made here in advance), and returns (outputs as a flat list,
    grads). Everything the harness needs is made before, so a launch count of the closure counts
    the op's launches only (plus autograd's own)."""
    import torch

    leaves = [a.detach().clone().requires_grad_(i in grad_idx) if isinstance(a, torch.Tensor) else a
              for i, a in enumerate(args)]  # fmt: skip
    upstream = {}

    def call():
        for i in grad_idx:
            leaves[i].grad = None
        if op in LOSS_OPS:
            out = fn(*leaves, **kwargs, return_metrics=metrics)
            loss, mets = out if metrics else (out, {})
            outputs = [loss, *[mets[key] for key in sorted(mets)]]
            differentiable = [loss]
        else:
            result = fn(*leaves, **kwargs)
            outputs = list(result) if isinstance(result, tuple) else [result]
            differentiable = [o for o in outputs if o.requires_grad]
        grads = []
        if backward and differentiable and grad_idx:
            if not upstream:  # first call: the upstream gradients (1.7 for a loss, fixed weights else)
                upstream.update({j: torch.full_like(o, 1.7) if o.dim() == 0 else
                                 torch.linspace(0.5, 1.5, o.numel(), device=o.device).view_as(o).to(o.dtype)
                                 for j, o in enumerate(differentiable)})  # fmt: skip
            torch.autograd.backward(differentiable, [upstream[j] for j in range(len(differentiable))])
            grads = [leaves[i].grad for i in grad_idx]
        return outputs, grads

    return call


def run_op(fn, op, args, kwargs, grad_idx, metrics: bool = True, backward: bool = True):
    """The op once, fwd (+ bwd): (outputs, grads)."""
    return prepare(fn, op, args, kwargs, grad_idx, metrics, backward)()


def excess(actual, expected, rtol: float, atol: float) -> float:
    """max |a - e| / (atol + rtol |e|) over elements: <= 1 passes. A missing gradient counts as
    zeros (a loss that does not use an input: the kernels may write zeros, autograd gives None)."""
    import torch

    if expected is None and actual is None:
        return 0.0
    if expected is None or actual is None:
        present = actual if expected is None else expected
        expected, actual = (torch.zeros_like(present), present) if expected is None else (present, torch.zeros_like(present))
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float(((a - e).abs() / (atol + rtol * e.abs())).max())


def _tolerance(tensor, scale_from) -> tuple[float, float]:
    """(rtol, atol) for a value stored in tensor's dtype: its rounding, relative to the largest
    magnitude of the oracle's value, and never finer than the dtype's smallest subnormal step: a
    value below that cannot be stored at all. That floor matters for fp16 gradients of a mean over
    millions of elements with no beta to scale them (NCP's SFT at the feature shape: about 1e-8,
    under fp16's 6e-8 step; even the fp64 oracle rounded to fp16 is off by that much), which
    training only meets behind DeepSpeed's fp16 loss scaling."""
    rtol = GRAD_TOLERANCE[str(tensor.dtype).split(".")[-1]] if tensor is not None else 1e-4
    scale = float(scale_from.detach().abs().max()) if scale_from is not None else 1.0
    step = subnormal_step(tensor.dtype) if tensor is not None else 0.0
    return rtol, rtol * scale + step + 1e-12


def subnormal_step(dtype) -> float:
    """The smallest subnormal of a half-precision dtype (its finest step near 0); 0 for the others."""
    import torch

    if dtype not in (torch.float16, torch.bfloat16):
        return 0.0
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def below_resolution(stored, oracle) -> bool:
    """True when a half-precision value's oracle is so small (under 64 of the dtype's smallest
    subnormal steps at its largest) that a zero or sign-flipped result would pass the floored
    tolerance: such a row says nothing and is reported, not graded. Training meets such values only
    behind fp16 loss scaling."""
    if stored is None or oracle is None or subnormal_step(stored.dtype) == 0.0:
        return False
    return float(oracle.detach().abs().max()) < 64 * subnormal_step(stored.dtype)


# ---------------------------------------------------------------------------------------------
# Sections


def check_correctness(report: Report, triton_ops, reference, device, shapes, ncp_shape) -> None:
    import torch

    cases = []
    for op in ALL_OPS:
        op_shapes = dict(shapes)
        if op.startswith("ncp_loss"):
            op_shapes["ncp"] = ncp_shape
        for shape_name, shape in op_shapes.items():
            for dtype_name in DTYPES:
                ks = POOL_KS if op in ("pool_step", "pool_logprobs") else (0,)
                for k in ks:
                    cases.append((op, shape_name, shape, dtype_name, k))
    for op, shape_name, shape, dtype_name, k in cases:
        case = f"{shape_name}_{'x'.join(map(str, shape))}_{dtype_name}" + (f"_k{k}" if k else "")
        args, kwargs, grad_idx = make_inputs(op, shape, dtype_name, device, k=k or 2)
        out_t, grads_t = run_op(op_function(triton_ops, op), op, args, kwargs, grad_idx)
        fp64 = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
        kw64 = {key: (v.double() if isinstance(v, torch.Tensor) else v) for key, v in kwargs.items()}
        out_r, grads_r = run_op(op_function(reference, op), op, fp64, kw64, grad_idx)
        if op == "pool_step":  # the log-probs are those of the STORED (rounded) samples: their oracle
            samples_t, logp_t = out_t[0], out_t.pop()  # is the fp64 density of Triton's own samples
            out_r.pop()
            expected = torch.stack([reference.transition_logprob(samples_t[:, j].double(), out_r[1], out_r[2])
                                    for j in range(samples_t.shape[1])], 1)  # fmt: skip
            err = excess(logp_t, expected, 1e-4, 1e-6)
            report.add("correctness", op, case, "triton", "logprob_error_over_tolerance", err, "<= 1",
                       "PASS" if err <= 1 else "FAIL")
        if op in LOSS_OPS:  # 0-d loss and metrics, reduced in fp32/fp64 from the same rounded inputs
            worst = max(excess(a, b, LOSS_RTOL, LOSS_ATOL) for a, b in zip(out_t, out_r))
        else:  # tensors stored in their dtype
            worst = max(excess(a, b, *_tolerance(a, b)) for a, b in zip(out_t, out_r))
        report.add("correctness", op, case, "triton", "outputs_error_over_tolerance", worst, "<= 1",
                   "PASS" if worst <= 1 else "FAIL")
        for i, (g_t, g_r) in enumerate(zip(grads_t, grads_r)):
            err = excess(g_t, g_r, *_tolerance(g_t if g_t is not None else g_r, g_r if g_r is not None else g_t))
            if below_resolution(g_t, g_r):  # nothing stored in this dtype could be told from 0: not graded
                report.add("correctness", op, case, "triton", f"grad{i}_below_dtype_resolution", err,
                           "not graded: the oracle is under 64 subnormal steps of the dtype")
                continue
            report.add("correctness", op, case, "triton", f"grad{i}_error_over_tolerance", err, "<= 1",
                       "PASS" if err <= 1 else "FAIL")
    # pool_step's own noise (Philox): reproducible, seed-dependent, standard normal
    shape = shapes.get("sdxl", next(iter(shapes.values())))
    x_t, eps = torch.randn(shape, device=device), torch.randn(shape, device=device)
    for seed in (0, 123, 2**62 - 1):
        s1, mean, std = triton_ops.pool_step(x_t, eps, 0.3, 0.35, 1.0, 4, seed=seed)
        s2 = triton_ops.pool_step(x_t, eps, 0.3, 0.35, 1.0, 4, seed=seed)[0]
        z = ((s1 - mean.unsqueeze(1)) / std.view(-1, 1, 1, 1, 1)).double()
        other = triton_ops.pool_step(x_t, eps, 0.3, 0.35, 1.0, 4, seed=seed ^ 1)[0]
        n = z.numel()
        ok = (torch.equal(s1, s2) and not torch.equal(s1, other) and abs(float(z.mean())) < 5 / math.sqrt(n)
              and abs(float(z.std()) - 1) < 5 / math.sqrt(n) + 1e-3)  # fmt: skip
        report.add("correctness", "pool_step", f"philox_seed_{seed}", "triton", "z_mean", float(z.mean()),
                   "same seed same noise, other seed other noise, N(0,1)", "PASS" if ok else "FAIL")


def count_launches(fn_call) -> tuple[int, int, int]:
    """(Triton kernel launches, torch ops that launch, ops that sync or would copy from the host)
    during fn_call()."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from spoxl.kernels import _triton_kernels as K
    from spoxl.kernels import _triton_ops

    free = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "squeeze", "unsqueeze",
            "slice", "select", "as_strided", "detach", "alias", "empty", "empty_like", "empty_strided",
            "new_empty", "new_empty_strided", "split", "chunk", "unbind", "flatten", "unflatten", "_reshape_alias",
            "lift_fresh", "set_"}  # fmt: skip
    # .item(), nonzero and tensor literals (lift_fresh: built on the host, a blocking copy when the
    # target is a GPU); on CUDA also every _to_copy/copy_ from a host tensor (_host_to_device)
    syncing = {"_local_scalar_dense", "nonzero", "item", "lift_fresh", "lift_fresh_copy"}
    counts = {"triton": 0, "torch": 0, "sync": 0}
    inside_kernel = [False]  # the interpreter runs a kernel through torch copies: not the op's launches

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # Not the op's device work: the interpreter's own copies inside a launch, and scalar
            # math the op declares as host-side (1-element CPU tensors; _triton_ops.host_math,
            # which must only ever see CPU tensors: checked here).
            host = _triton_ops.HOST_MATH.active
            if host:
                tensors = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
                assert all(t.device.type == "cpu" and t.numel() <= 1 for t in tensors), f"host_math saw {func}"
            if not inside_kernel[0] and not host:
                name = func.overloadpacket.__name__
                if name in syncing or (name in ("_to_copy", "copy_") and _host_to_device(func, args, kwargs)):
                    counts["sync"] += 1
                if name not in free:
                    counts["torch"] += 1
            return func(*args, **(kwargs or {}))

    class CountingKernel:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def counted(*args, **kwargs):
                counts["triton"] += 1
                inside_kernel[0] = True
                try:
                    return launch(*args, **kwargs)
                finally:
                    inside_kernel[0] = False

            return counted

        def __getattr__(self, name):
            return getattr(self.kernel, name)

    # The launched kernels (named *_kernel); the @triton.jit helpers they call stay as they are.
    originals = {name: obj for name, obj in vars(K).items() if name.endswith("_kernel") and hasattr(obj, "__getitem__")}
    try:
        for name, obj in originals.items():
            setattr(K, name, CountingKernel(obj))
        with Counter():
            fn_call()
    finally:
        for name, obj in originals.items():
            setattr(K, name, obj)
    return counts["triton"], counts["torch"], counts["sync"]


def _host_to_device(func, args, kwargs) -> bool:
    import torch

    src = args[1] if func.overloadpacket.__name__ == "copy_" else args[0]
    dst_device = (kwargs or {}).get("device") if func.overloadpacket.__name__ == "_to_copy" else args[0].device
    return (isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst_device is not None
            and torch.device(dst_device).type != "cpu")  # fmt: skip


def cuda_syncs(fn_call) -> tuple[int, list[str]]:
    """(host syncs torch's sync debug mode sees during fn_call(), the stack of the first one:
    'file:line' of the frames in this repository, innermost first)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn_call()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    flagged = [w for w in caught if "synchroniz" in str(w.message)]
    syncs = len(flagged)
    # the warning's own location: the Python line that ran the syncing op (an autograd backward's
    # too, which the traceback below, rethrown from autograd's device thread, does not hold)
    sites = [f"warned at {_short(flagged[0].filename)}:{flagged[0].lineno}"] if flagged else []
    if syncs:
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn_call()
        except RuntimeError as exc:
            import traceback

            frames = traceback.extract_tb(exc.__traceback__)
            sites += [f"{_short(f.filename)}:{f.lineno}" for f in reversed(frames)]
            sites.append(str(exc).splitlines()[0][:100])
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return syncs, sites


def _short(filename: str) -> str:
    """A path relative to the repository, or its last two parts (torch's own files)."""
    path = Path(filename).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else "/".join(path.parts[-2:])


def check_syncs_and_launches(report: Report, triton_ops, device, shape, on_gpu: bool) -> None:
    import torch

    if on_gpu:
        # The probe itself: its first use (seen once on torch 2.11) is warm-up and only reported;
        # then a device op must count 0 and a host read of a device value at least 1, or the
        # per-op counts below mean nothing.
        x = torch.ones(4, device=device)
        report.add("syncs", "harness", "first_use", "torch", "cuda_syncs", cuda_syncs(lambda: x.add(1))[0])
        quiet = cuda_syncs(lambda: x.add(1))[0]
        report.add("syncs", "harness", "device_op", "torch", "cuda_syncs", quiet, "0", "PASS" if quiet == 0 else "FAIL")
        loud = cuda_syncs(lambda: x.sum().item())[0]
        report.add("syncs", "harness", "host_read", "torch", "cuda_syncs", loud, ">= 1", "PASS" if loud >= 1 else "FAIL")
    for op in ALL_OPS:
        args, kwargs, grad_idx = make_inputs(op, shape, "mixed_bf16", device)
        fn = op_function(triton_ops, op)
        call = prepare(fn, op, args, kwargs, grad_idx)
        call()  # warm: compiles, caches and upstream gradients outside the count
        triton_n, torch_n, suspects = count_launches(call)
        total = triton_n + torch_n
        report.add("launches", op, "fwd+bwd_metrics", "triton", "device_launches", total,
                   f"<= {LAUNCH_BUDGET}", "PASS" if total <= LAUNCH_BUDGET else "INFO")
        report.add("launches", op, "fwd+bwd_metrics", "triton", "triton_kernels", triton_n)
        report.add("launches", op, "fwd+bwd_metrics", "triton", "torch_ops", torch_n)
        report.add("syncs", op, "fwd+bwd_metrics", "triton", "sync_suspect_ops", suspects, "0",
                   "PASS" if suspects == 0 else "INFO")
        if on_gpu:
            syncs, sites = cuda_syncs(call)
            report.add("syncs", op, "fwd+bwd_metrics", "triton", "cuda_syncs", syncs, "0",
                       "PASS" if syncs == 0 else "FAIL")
            if syncs:  # where, so the next session need not spend device time to find it
                report.add("syncs", op, "fwd+bwd_metrics", "triton", "sync_sites", " <- ".join(sites) or "unknown")
                again = cuda_syncs(call)[0]
                report.add("syncs", op, "fwd+bwd_metrics", "triton", "cuda_syncs_on_next_call", again)
    # recompiles across sampler-style seeds: the kernel caches must not grow with the seed
    from spoxl.kernels import _triton_kernels as K

    x_t, eps = torch.randn(shape, device=device), torch.randn(shape, device=device)
    # Warm with a 62-bit seed as the sampler draws them (a seed < 2^31 is typed i32 by Triton, a
    # separate variant the sampler never uses).
    triton_ops.pool_step(x_t, eps, 0.3, 0.35, 1.0, 2, seed=2**62 - 7)
    before = _cache_sizes(K)
    for seed in range(50):
        triton_ops.pool_step(x_t, eps, 0.3, 0.35, 1.0, 2, seed=(seed * 2654435761) % 2**62)
    grown = _cache_sizes(K) - before if before is not None else None
    if grown is None:
        report.add("syncs", "pool_step", "50_seeds", "triton", "recompiles", "n/a (interpreter: no compiled cache)")
    else:
        report.add("syncs", "pool_step", "50_seeds", "triton", "recompiles", grown, "0",
                   "PASS" if grown == 0 else "FAIL")


def _cache_sizes(K):
    """Compiled variants held by every kernel (None when no kernel keeps a cache: the interpreter)."""
    total, seen = 0, False
    for obj in vars(K).values():
        caches = getattr(obj, "device_caches", None)
        if caches:
            seen = True
            total += sum(len(entry[0]) for entry in caches.values())
        elif isinstance(getattr(obj, "cache", None), dict) and obj.cache:
            seen = True
            total += sum(len(c) for c in obj.cache.values())
    return total if seen else None


def _time(fn, device, reps: int, warmup: int) -> float:
    """Median seconds of fn() (CUDA events on a GPU, perf_counter on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _kernel_seconds(fn, reps: int) -> float:
    """Summed device time of the kernels of one fn() call, from torch.profiler (CUDA only)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / 1e6 / reps


def copy_bandwidth(device, n_bytes: int, reps: int) -> float:
    import torch

    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), device, reps, 3)
    return 2 * src.numel() * 4 / seconds  # read + write


# Inputs an op's loss never reads: NCP's CPO and SFT have no reference term (args 2, 3 are the
# reference features), so counting them would credit the kernel with traffic it never moves.
UNREAD_ARGS = {"ncp_loss_cpo": (2, 3), "ncp_loss_sft": (2, 3)}


def ideal_bytes(args, grad_idx, backward: bool, op: str = "") -> int:
    """Every tensor input the op reads, read once; with backward, the differentiable ones'
    gradients written once (and, as the kernels must, their inputs read again)."""
    import torch

    unread = UNREAD_ARGS.get(op, ())
    tensors = [a for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in unread]
    total = sum(t.numel() * t.element_size() for t in tensors)
    if backward:
        total += sum(2 * args[i].numel() * args[i].element_size() for i in grad_idx)
    return total


def check_speed(report: Report, triton_ops, reference, device, shapes, on_gpu: bool, reps: int) -> None:
    import torch

    providers = {"eager": reference, "triton": triton_ops}
    compiled = {}
    if on_gpu:
        for op in LOSS_OPS + ("pool_logprobs", "transition_logprob"):
            compiled[op] = torch.compile(op_function(reference, op), dynamic=False)
    peak = copy_bandwidth(device, (1 << 30) if on_gpu else (8 << 20), reps)
    report.add("speed", "copy", "d2d" if on_gpu else "host", "torch", "bytes_per_s", peak,
               status="INFO")
    for op in ALL_OPS:
        shape = shapes["ncp"] if op.startswith("ncp_loss") else shapes["sdxl"]
        args, kwargs, grad_idx = make_inputs(op, shape, "mixed_bf16", device, k=4)
        for mode in (("forward", "full") if grad_idx else ("forward",)):
            for metrics in ((True, False) if op in LOSS_OPS else (True,)):
                backward = mode == "full"
                seconds = {}
                for name, fn in [*((n, op_function(m, op)) for n, m in providers.items()),
                                 *((("compile", compiled[op]),) if op in compiled else ())]:  # fmt: skip
                    call = prepare(fn, op, args, kwargs, grad_idx, metrics, backward)
                    try:
                        seconds[name] = _time(call, device, reps, 2)
                    except Exception as exc:  # a provider that cannot run this case is reported, not fatal
                        report.add("speed", op, mode, name, "error", type(exc).__name__ + ": " + str(exc)[:120],
                                   status="FAIL")
                        continue
                    case = f"{mode}{'_metrics' if metrics else ''}"
                    report.add("speed", op, case, name, "wall_ms", 1e3 * seconds[name])
                    if on_gpu:
                        kernel_s = _kernel_seconds(call, 3)
                        report.add("speed", op, case, name, "kernel_ms", 1e3 * kernel_s)
                        if name == "triton":
                            bw = ideal_bytes(args, grad_idx, backward, op) / max(kernel_s, 1e-9)
                            goal = op.startswith("ncp_loss") and mode == "full" and metrics
                            report.add("speed", op, case, name, "bandwidth_fraction_of_copy", bw / peak,
                                       f">= {BANDWIDTH_FRACTION}" if goal else "",
                                       ("PASS" if bw / peak >= BANDWIDTH_FRACTION else "FAIL") if goal else "INFO")
                if "triton" in seconds:
                    graded = on_gpu and mode == "full" and metrics and op in LOSS_OPS
                    for base, need in (("eager", SPEEDUP_EAGER), ("compile", SPEEDUP_COMPILE)):
                        if base in seconds:
                            ratio = seconds[base] / seconds["triton"]
                            report.add("speed", op, f"{mode}{'_metrics' if metrics else ''}", f"triton_vs_{base}",
                                       "speedup", ratio, f">= {need}" if graded else "",
                                       ("PASS" if ratio >= need else "FAIL") if graded else "INFO")


def check_unet_step(report: Report, device, on_gpu: bool) -> None:
    if not on_gpu:
        report.add("unet", "sdxl_unet", "1024px_bf16", "torch", "skipped", "CPU mode")
        return
    try:
        from diffusers import UNet2DConditionModel
    except ImportError:
        report.add("unet", "sdxl_unet", "1024px_bf16", "torch", "skipped", "diffusers not installed (carry its wheel)")
        return
    import torch

    from spoxl.models.sdxl_config import SDXL_FORWARD_TFLOP_1024PX, sdxl_unet_config

    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**sdxl_unet_config()).to(torch.bfloat16)
    batch = 1
    x = torch.randn(batch, 4, 128, 128, device=device, dtype=torch.bfloat16)
    t = torch.full((batch,), 500, device=device)
    text = torch.randn(batch, 77, 2048, device=device, dtype=torch.bfloat16)
    added = {"text_embeds": torch.randn(batch, 1280, device=device, dtype=torch.bfloat16),
             "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * batch, device=device, dtype=torch.bfloat16)}

    def step():
        out = unet(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        out.float().square().mean().backward()
        unet.zero_grad(set_to_none=True)

    seconds = _time(step, device, 3, 1)
    tflops = 3 * SDXL_FORWARD_TFLOP_1024PX * batch / seconds
    report.add("unet", "sdxl_unet", "1024px_bf16_b1", "torch", "fwd_bwd_s", seconds)
    report.add("unet", "sdxl_unet", "1024px_bf16_b1", "torch", "tflop_per_s", tflops)
    report.add("unet", "sdxl_unet", "1024px_bf16_b1", "torch", "peak_gib", torch.cuda.max_memory_allocated() / 2**30)


# ---------------------------------------------------------------------------------------------


def device_label(on_gpu: bool) -> str:
    import torch

    if not on_gpu:
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name().lower()).strip("_")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA exists (tiny shapes, interpreter)")
    p.add_argument("--sections", nargs="+", default=["correctness", "syncs", "speed", "unet"],
                   choices=["correctness", "syncs", "speed", "unet"], help="what to run (default all)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 20 on GPU, 2 on CPU)")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    import torch

    on_gpu = torch.cuda.is_available() and not args.cpu
    interpret = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
    if on_gpu and interpret:
        sys.exit("gpu_check: TRITON_INTERPRET=1 is set: the kernels would run in the interpreter, not on the GPU; "
                 "unset it (or pass --cpu)")
    if not on_gpu:
        if "spoxl.kernels._triton_ops" in sys.modules and not interpret:
            sys.exit("gpu_check: the Triton kernels were imported without TRITON_INTERPRET=1; run CPU mode in a "
                     "fresh process")
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported: they run interpreted
        print("gpu_check: CPU mode: tiny shapes, Triton under the interpreter; correctness and launch counts "
              "hold, timings say nothing about speed", flush=True)
    from spoxl.kernels import backend_ops

    triton_ops, reference = backend_ops("triton"), backend_ops("torch")

    device = torch.device("cuda" if on_gpu else "cpu")
    reps = args.reps or (20 if on_gpu else 2)
    shapes = dict(GPU_SHAPES if on_gpu else CPU_SHAPES)
    ncp_shape = GPU_NCP_SHAPE if on_gpu else CPU_NCP_SHAPE
    label = device_label(on_gpu)
    path = Path(args.out_dir) / f"gpu_check_{label}.csv"
    import triton

    report = Report(f"{torch.cuda.get_device_name()} (torch {torch.__version__}, triton {triton.__version__})" if on_gpu
                    else f"cpu {platform.machine()} x{os.cpu_count()} (torch {torch.__version__}, interpreter)",
                    path)  # fmt: skip
    started = time.time()
    if "correctness" in args.sections:
        check_correctness(report, triton_ops, reference, device, shapes, ncp_shape)
        n = sum(r["section"] == "correctness" for r in report.rows)
        print(f"[correctness] {n} checks, {sum(r['status'] == 'FAIL' for r in report.rows)} failed "
              f"({time.time() - started:.0f} s)", flush=True)
    if "syncs" in args.sections:
        check_syncs_and_launches(report, triton_ops, device, shapes["sdxl" if on_gpu else "tiny"], on_gpu)
        print(f"[syncs] done ({time.time() - started:.0f} s)", flush=True)
    # The UNet step before the speed section: torch.compile's many compiles there are the slowest
    # part, and what a run cut short loses should be the least of it.
    if "unet" in args.sections:
        check_unet_step(report, device, on_gpu)
        print(f"[unet] done ({time.time() - started:.0f} s)", flush=True)
    if "speed" in args.sections:
        speed_shapes = {"sdxl": shapes["sdxl" if on_gpu else "tiny"], "ncp": ncp_shape}
        check_speed(report, triton_ops, reference, device, speed_shapes, on_gpu, reps)

    report.write()
    failed = report.failures()
    print(f"gpu_check: {len(report.rows)} rows, {len(failed)} FAIL, {time.time() - started:.0f} s on {report.device}; "
          f"wrote {path}", flush=True)
    for r in failed[:20]:
        print(f"  FAIL {r['section']} {r['op']} {r['case']} {r['provider']} {r['metric']} = {r['value']} {r['goal']}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
