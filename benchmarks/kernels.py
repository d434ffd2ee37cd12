"""Microbenchmarks of spoxl.kernels: every op, forward / backward / full, per provider.

Providers: eager torch (the torch references, spoxl.kernels.backend_ops('torch')), torch.compile of the same reference, and the
Triton kernels (CUDA only). Shapes: SDXL training shapes (pairs = 8, latents 4x128x128, pools of
k = 2 and 4; NCP on 1280x32x32 U-Net encoder features) and small ones. Reports the median time
(p20/p80 too), peak memory, and the effective bandwidth of the ideal traffic (every input read
once, every output written once) so GPU numbers can be held against HBM bandwidth.

On CPU only the torch providers run (the Triton interpreter is a correctness tool, not a
performance one), with one intra-op thread by default (--threads), and peak memory is the
process's peak-RSS growth during one call. CPU numbers on a shared machine are noisy.

    python benchmarks/kernels.py --quick          # small shapes, few reps: a CPU smoke run
    python benchmarks/kernels.py                  # all shapes (on a GPU: the real numbers)

Writes benchmarks/results/kernels_<device>[_quick].csv and .png.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spoxl.kernels import backend_ops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("forward", "backward", "full")


# ---------------------------------------------------------------------------------------------
# Ops: inputs, the differentiable inputs, and the ideal bytes moved per mode


@dataclass
class Case:
    op: str
    shape_name: str
    shape: tuple
    k: int = 0  # pool size for pool ops


def _latents(batch, dtype, device, grad=False, n=1):
    return [torch.randn(batch, dtype=dtype, device=device, requires_grad=grad) for _ in range(n)]


# The papers' settings (the ops take them as required keywords; methods pass their configs').
LOSS_SETTINGS = {
    "spo_loss": {"beta": 10.0, "clip": 0.1},
    "diffusion_dpo_loss": {"beta": 5000.0},
    "mapo_loss": {"beta": 0.1, "snr": 0.5, "num_train_timesteps": 1000},
    "ncp_loss": {"beta": 2500.0, "kind": "dpo"},
}


def build(case: Case, dtype, device):
    """(args, kwargs, grad_inputs, bytes_per_mode) for one benchmark case."""
    shape, k = case.shape, case.k
    numel = 1
    for d in shape:
        numel *= d
    e = torch.finfo(dtype).bits // 8
    std = torch.full((shape[0],), 0.5, device=device)
    if case.op == "spo_loss":
        x_w, x_l, ref_w, ref_l = _latents(shape, dtype, device, n=4)
        mean_w, mean_l = _latents(shape, dtype, device, grad=True, n=2)
        return (x_w, x_l, mean_w, mean_l, ref_w, ref_l, std), LOSS_SETTINGS[case.op], [mean_w, mean_l], _bytes(numel * e, 6, 4, 2)
    if case.op in ("diffusion_dpo_loss", "ncp_loss"):
        pred_w, pred_l = _latents(shape, dtype, device, grad=True, n=2)
        rest = _latents(shape, dtype, device, n=4)
        return (pred_w, pred_l, *rest), LOSS_SETTINGS[case.op], [pred_w, pred_l], _bytes(numel * e, 6, 4, 2)
    if case.op == "mapo_loss":
        pred_w, pred_l = _latents(shape, dtype, device, grad=True, n=2)
        t_w, t_l = _latents(shape, dtype, device, n=2)
        return (pred_w, pred_l, t_w, t_l), LOSS_SETTINGS[case.op], [pred_w, pred_l], _bytes(numel * e, 4, 4, 2)
    if case.op == "transition_logprob":
        (x,) = _latents(shape, dtype, device)
        (mean,) = _latents(shape, dtype, device, grad=True)
        return (x, mean, std), {}, [mean], _bytes(numel * e, 2, 2, 1)
    if case.op == "pool_logprobs":
        samples = torch.randn(shape[0], k, *shape[1:], dtype=dtype, device=device)
        mean, ref = _latents(shape, dtype, device, grad=True, n=2)
        return (samples, mean, ref, std), {}, [mean, ref], _bytes(numel * e, k + 2, k + 2, 2)
    if case.op == "pool_step":
        x_t, eps = _latents(shape, dtype, device, n=2)
        # reads x_t, eps; writes k candidates (x dtype) and the fp32 mean.
        fwd = numel * (2 * e + k * e + 4)
        return (x_t, eps, 0.3, 0.35, 1.0, k), {"seed": 0}, [], {"forward": fwd}
    raise ValueError(case.op)


def _bytes(tensor_bytes, fwd_reads, bwd_reads, bwd_writes):
    bwd = tensor_bytes * (bwd_reads + bwd_writes)
    return {"forward": tensor_bytes * fwd_reads, "backward": bwd, "full": tensor_bytes * fwd_reads + bwd}


def cases(quick: bool):
    sdxl, small, ncp_sdxl, ncp_small = (8, 4, 128, 128), (2, 4, 32, 32), (8, 1280, 32, 32), (2, 64, 8, 8)
    shapes = [("small", small, ncp_small)] + ([] if quick else [("sdxl", sdxl, ncp_sdxl)])
    out = []
    for name, latent, feat in shapes:
        for op in ("spo_loss", "diffusion_dpo_loss", "mapo_loss", "transition_logprob"):
            out.append(Case(op, name, latent))
        out.append(Case("ncp_loss", name, feat))
        for k in (2, 4):
            out.append(Case("pool_logprobs", f"{name}_k{k}", latent, k))
            out.append(Case("pool_step", f"{name}_k{k}", latent, k))
    return out


# ---------------------------------------------------------------------------------------------
# Providers


def provider_fns(device, providers):
    reference = backend_ops("torch")
    fns = {}
    if "torch" in providers:
        fns["torch"] = lambda op: getattr(reference, op)
    if "torch.compile" in providers:
        cache = {}

        def compiled(op):
            if op not in cache:
                cache[op] = torch.compile(getattr(reference, op), dynamic=False)
            return cache[op]

        fns["torch.compile"] = compiled
    if "triton" in providers:
        triton_ops = backend_ops("triton")
        fns["triton"] = lambda op: getattr(triton_ops, op)
    return fns


def outputs_and_grads(out):
    """The differentiable outputs of an op and all-ones cotangents for them."""
    if isinstance(out, tuple):
        tensors = [t for t in out if isinstance(t, torch.Tensor) and t.requires_grad]
    else:
        tensors = [out]
    return tensors, [torch.ones_like(t) for t in tensors]


# ---------------------------------------------------------------------------------------------
# Timing and memory


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, warmup, reps):
    """(p50, p20, p80) in ms. triton.testing.do_bench on CUDA; a synchronised perf_counter loop on CPU."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return statistics.median(times), q[1], q[7]


def _proc_status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def peak_memory_mb(fn, device):
    """Peak memory of one call: CUDA max_memory_allocated, or on Linux CPU the growth of the
    process's peak RSS after resetting it (/proc/self/clear_refs = 5); else 'n/a'."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return f"{torch.cuda.max_memory_allocated() / 2**20:.1f}"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kb("VmRSS")
        fn()
        peak = _proc_status_kb("VmHWM")
        return f"{max(peak - base, 0) / 1024:.1f}"
    except OSError:
        return "n/a"


def run_case(case, fn, mode, dtype, device, warmup, reps):
    """(p50, p20, p80, peak_mem, ideal_bytes) of one op/provider/mode."""
    args, kwargs, grad_inputs, ideal_bytes = build(case, dtype, device)

    def clear():
        for t in grad_inputs:
            t.grad = None

    if mode == "forward":  # with autograd recording, as in training (and one compiled graph for both)
        def call():  # noqa: E306
            fn(*args, **kwargs)
    elif mode == "full":
        def call():  # noqa: E306
            clear()
            outs, grads = outputs_and_grads(fn(*args, **kwargs))
            torch.autograd.backward(outs, grads)
    else:  # backward: one forward, then time the backward alone over the retained graph
        outs, grads = outputs_and_grads(fn(*args, **kwargs))

        def call():
            clear()
            torch.autograd.backward(outs, grads, retain_graph=True)
    p50, p20, p80 = time_fn(call, device, warmup, reps)
    return p50, p20, p80, peak_memory_mb(call, device), ideal_bytes[mode]


# ---------------------------------------------------------------------------------------------
# Output


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} ({os.cpu_count()} cores)"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_plot(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["kernel"] for r in rows})
    providers = sorted({r["provider"] for r in rows})
    cols = 3
    fig, axes = plt.subplots((len(ops) + cols - 1) // cols, cols, figsize=(6 * cols, 3.6 * ((len(ops) + 2) // cols)))
    axes = axes.flatten()
    for ax, op in zip(axes, ops):
        op_rows = [r for r in rows if r["kernel"] == op]
        groups = sorted({(r["shape_name"], r["mode"]) for r in op_rows})
        width = 0.8 / len(providers)
        for i, prov in enumerate(providers):
            values = []
            for g in groups:
                hit = [r for r in op_rows if (r["shape_name"], r["mode"]) == g and r["provider"] == prov]
                values.append(float(hit[0]["ms_p50"]) if hit else float("nan"))  # not run: no bar
            ax.bar([j + i * width for j in range(len(groups))], values, width, label=prov)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{s}\n{m}" for s, m in groups], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("median ms (log)")
        ax.set_title(op)
        ax.legend(fontsize=7)
    for ax in axes[len(ops):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repetitions")
    parser.add_argument("--ops", nargs="*", help="only these ops (default: all)")
    parser.add_argument("--providers", nargs="*", help="subset of torch, torch.compile, triton")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--reps", type=int, help="timed repetitions on CPU (default 5 quick, 20 full)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU only: torch intra-op threads (1 keeps timings stable on shared cores)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = ["torch", "torch.compile"] + (["triton"] if device.type == "cuda" else [])
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        print("No CUDA device: running the torch providers only (eager, torch.compile); the Triton "
              "kernels are benchmarked on a GPU. Their correctness is tested under TRITON_INTERPRET.")  # fmt: skip
    providers = [p for p in (args.providers or available) if p in available]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    reps = args.reps or (5 if args.quick else 20)
    warmup = 2 if args.quick else 5
    name = device_name(device)
    fns = provider_fns(device, providers)
    meta = {
        "device": name,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rows = []
    for case in cases(args.quick):
        if args.ops and case.op not in args.ops:
            continue
        modes = ("forward",) if case.op == "pool_step" else MODES
        for prov, get in fns.items():
            for mode in modes:
                if prov == "torch.compile" and case.op == "pool_step":
                    continue  # a sampler step under no_grad with a Generator: nothing for compile to fuse
                p50, p20, p80, mem, ideal = run_case(case, get(case.op), mode, dtype, device, warmup, reps)
                rows.append({
                    "kernel": case.op, "provider": prov, "mode": mode, "shape_name": case.shape_name,
                    "shape": "x".join(map(str, case.shape)) + (f" k={case.k}" if case.k else ""),
                    "dtype": str(dtype).replace("torch.", ""), "ms_p50": f"{p50:.4f}", "ms_p20": f"{p20:.4f}",
                    "ms_p80": f"{p80:.4f}", "peak_mem_mb": mem, "ideal_gb": f"{ideal / 1e9:.4f}",
                    "gb_per_s": f"{ideal / 1e9 / (p50 / 1e3):.2f}", "device": name, "torch": meta["torch"],
                    "triton": meta["triton"], "timestamp": meta["timestamp"],
                })  # fmt: skip
                print(f"{case.op:20s} {case.shape_name:9s} {prov:14s} {mode:9s} {p50:9.3f} ms  "
                      f"{rows[-1]['gb_per_s']:>8s} GB/s  peak {mem} MB", flush=True)  # fmt: skip
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_{slug(name)}{'_quick' if args.quick else ''}"
    csv_path, png_path = args.out_dir / f"{stem}.csv", args.out_dir / f"{stem}.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_plot(rows, png_path, f"spoxl.kernels on {name} ({rows[0]['dtype']}; median ms, lower is better)")
    print(f"wrote {csv_path} and {png_path}")
    print(json.dumps(meta))
    return 0


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
