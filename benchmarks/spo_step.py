"""One SPO sampling round + training on its pairs: our path vs the straightforward path, same run.

    python benchmarks/spo_step.py                      # tiny SDXL on CPU, both paths
    python benchmarks/spo_step.py --shape sdxl         # SDXL-shaped UNet/VAE (random weights), GPU
    python benchmarks/spo_step.py --paths ours         # one path only

ours:             the whole pool (prompts x k candidates, CFG halves) in ONE UNet call per
                  denoising step; a pair sharing x_t runs the policy/reference UNet once for w and
                  l; the fused spoxl.kernels.spo_loss.
straightforward:  one UNet call per candidate (each with its CFG halves, as the official pipeline
                  loops over its k samples); separate w and l forwards; the unfused torch loss.

Each path gets its own components built from the same seed (identical starting weights), draws
the same noise and keeps every pair (threshold 0), so both sample and train on the same pairs.
Prints pairs/s, UNet calls per trained pair and peak memory for each, and the ratios; writes
benchmarks/results/spo_step_<shape>_<device>.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class CountingUNet(torch.nn.Module):
    """Counts UNet calls; with `split` > 0 it runs any batch larger than `split` as several calls of
    `split` rows (the straightforward path: one call per candidate)."""

    def __init__(self, unet, split: int = 0):
        super().__init__()
        self.unet = unet
        self.split = split
        self.calls = 0

    @property
    def config(self):
        return self.unet.config

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
        if not self.split or x.shape[0] <= self.split:
            self.calls += 1
            return self.unet(x, t, encoder_hidden_states=encoder_hidden_states,
                             added_cond_kwargs=added_cond_kwargs, return_dict=False)  # fmt: skip
        outs = []
        for s in range(0, x.shape[0], self.split):
            sl = slice(s, s + self.split)
            self.calls += 1
            outs.append(self.unet(x[sl], t[sl], encoder_hidden_states=encoder_hidden_states[sl],
                                  added_cond_kwargs={k: v[sl] for k, v in added_cond_kwargs.items()},
                                  return_dict=False)[0])  # fmt: skip
        return (torch.cat(outs),)


class PeakMemory:
    """CUDA: max_memory_allocated. CPU: peak RSS sampled every 5 ms (psutil) during the block."""

    def __init__(self, device):
        self.device = device
        self.peak_mib = 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            self._proc, self._stop = psutil.Process(), threading.Event()

            def watch():
                while not self._stop.is_set():
                    self.peak_mib = max(self.peak_mib, self._proc.memory_info().rss / 2**20)
                    time.sleep(0.005)

            self._thread = threading.Thread(target=watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()


def build(shape: str, device, dtype, lora_rank: int, seed: int):
    """(components-like namespace, cond, uncond, time_ids, resolution) for the benchmark."""
    import peft

    from spoxl.models.text import PromptEmbeds, encode_prompts, make_time_ids

    torch.manual_seed(seed)
    if shape == "tiny":
        from spoxl.models.loading import load_sdxl

        comps = load_sdxl("tiny")
        res = 64
        encode = lambda prompts: encode_prompts(comps, prompts)  # noqa: E731
    else:  # SDXL-shaped random UNet and VAE from the bundled configs; random text embeddings
        from types import SimpleNamespace

        from diffusers import AutoencoderKL, UNet2DConditionModel

        from spoxl.cluster.memory import bundled_config
        from spoxl.models.tiny import sdxl_scheduler

        with torch.device(device):  # initialised where it runs: 2.6B parameters on a CPU take a minute
            unet = UNet2DConditionModel.from_config(bundled_config("unet"))
            vae = AutoencoderKL.from_config(bundled_config("vae"))
        comps = SimpleNamespace(unet=unet, vae=vae.requires_grad_(False).eval(), scheduler=sdxl_scheduler())
        res = 1024

        def encode(prompts):
            g = torch.Generator().manual_seed(len(prompts[0]))
            n = len(prompts)
            return PromptEmbeds(torch.randn(n, 77, 2048, generator=g), torch.randn(n, 1280, generator=g))

    comps.unet.requires_grad_(False)
    comps.unet.add_adapter(peft.LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
    comps.unet.to(device=device, dtype=dtype)
    comps.vae.to(device=device, dtype=dtype)
    for p in comps.unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights in fp32, as the official recipe
    return comps, encode, res


def run_path(name: str, comps, encode, res: int, args, device, dtype) -> dict:
    from spoxl.methods.spo import spo_pair_loss
    from spoxl.models.scorers import ColourScorer
    from spoxl.models.text import make_time_ids
    from spoxl.spo.pool_sampler import PoolSampler, PoolSamplerConfig

    ours = name == "ours"
    prompts = [["a red circle", "a green square", "a blue cat", "a yellow dog"][i % 4] for i in range(args.prompts)]
    cond, uncond = encode(prompts), encode([""] * len(prompts))
    cond, uncond = cond.to(device, dtype), uncond.to(device, dtype)
    time_ids = make_time_ids(len(prompts), (res, res), device=device, dtype=dtype)
    side = res // 8
    latents = torch.randn((len(prompts), 4, side, side), generator=torch.Generator().manual_seed(args.seed)).to(device)
    config = PoolSamplerConfig(steps=args.steps, cfg_scale=args.cfg, pool_size=args.k, num_inner_step=args.inner,
                               divert_start_step=args.divert, threshold=0.0)  # fmt: skip
    sampler = PoolSampler(config, comps.scheduler, comps.vae, ColourScorer())
    # straightforward sampling: one call per candidate = per (2 * prompts) rows (CFG halves included)
    unet = CountingUNet(comps.unet, split=0 if ours else 2 * len(prompts))
    params = [p for p in comps.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    @contextlib.contextmanager
    def reference():
        comps.unet.disable_adapters()
        try:
            with torch.no_grad():
                yield train_unet
        finally:
            comps.unet.enable_adapters()

    train_unet = CountingUNet(comps.unet)  # training calls are counted, never split
    kw = dict(scheduler=comps.scheduler, cfg_scale=args.cfg, uncond=uncond.index(slice(0, 1)),
              time_ids=time_ids[:1], share_sources=ours, device=device, dtype=dtype)  # fmt: skip

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    for rep in range(args.repeats + 1):  # the first repeat warms up and is not reported
        unet.calls = train_unet.calls = 0
        with PeakMemory(device) as mem:
            sync()
            t0 = time.perf_counter()
            comps.unet.eval()
            result = sampler.sample(unet, prompts, cond, uncond, time_ids, latents,
                                    torch.Generator().manual_seed(args.seed + 1))  # fmt: skip
            sync()
            t_sample = time.perf_counter() - t0
            pairs = result.pairs
            comps.unet.train()
            n = len(pairs)
            for s in range(0, n, args.micro_batch):
                batch = pairs.index(slice(s, s + args.micro_batch))
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss, _ = spo_pair_loss(train_unet, reference, batch, beta=10.0, clip=0.1, fused=ours, **kw)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
            total = time.perf_counter() - t0
        if rep == 0:
            continue
        rows.append({
            "path": name, "shape": args.shape, "device": device_name(device), "dtype": str(dtype).split(".")[-1],
            "prompts": len(prompts), "k": args.k, "lora_rank": args.lora_rank, "micro_batch": args.micro_batch, "inner_steps": args.inner, "steps": args.steps, "pairs": n,
            "sample_s": round(t_sample, 4), "train_s": round(total - t_sample, 4), "total_s": round(total, 4),
            "pairs_per_s": round(n / total, 4), "sample_unet_calls": unet.calls, "train_unet_calls": train_unet.calls,
            "unet_calls_per_pair": round((unet.calls + train_unet.calls) / max(n, 1), 4),
            "train_unet_calls_per_pair": round(train_unet.calls / max(n, 1), 4),
            "peak_mem_mib": round(mem.peak_mib, 1),
        })  # fmt: skip
    return median_row(rows)


def median_row(rows: list[dict]) -> dict:
    rows = sorted(rows, key=lambda r: r["total_s"])
    return rows[len(rows) // 2]


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    import platform

    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["tiny", "sdxl"], default="tiny")
    p.add_argument("--paths", default="ours,straightforward")
    p.add_argument("--prompts", type=int, default=2, help="prompts per round (per GPU in the recipe)")
    p.add_argument("--k", type=int, default=2, help="pool size")
    p.add_argument("--inner", type=int, default=3, help="num_inner_step (3: the SDXL recipe)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--divert", type=int, default=4)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--micro-batch", type=int, default=2, help="pairs per training micro-step")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.shape == "sdxl" and device.type != "cuda":
        print("spo_step: --shape sdxl needs a GPU (SDXL at 1024 px on CPU would take hours)", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    for name in args.paths.split(","):
        # Fresh components per path, built from the same seed: each path trains its LoRA, so
        # sharing one set would make the second path sample from the first one's trained policy.
        comps, encode, res = build(args.shape, device, dtype, args.lora_rank, args.seed)
        results.append(run_path(name, comps, encode, res, args, device, dtype))
        del comps
        if device.type == "cuda":
            torch.cuda.empty_cache()

    cols = ["path", "pairs", "pairs_per_s", "unet_calls_per_pair", "train_unet_calls_per_pair", "sample_s", "train_s",
            "peak_mem_mib"]  # fmt: skip
    print(f"SPO round + training, {args.shape} shapes on {device_name(device)} ({str(dtype).split('.')[-1]}), "
          f"{args.prompts} prompts, k={args.k}, {args.inner} inner steps, {args.steps} steps")  # fmt: skip
    print("  ".join(f"{c:>24}" for c in cols))
    for r in results:
        print("  ".join(f"{r[c]!s:>24}" for c in cols))
    by = {r["path"]: r for r in results}
    if "ours" in by and "straightforward" in by:
        o, s = by["ours"], by["straightforward"]
        print(f"ratios (ours / straightforward): pairs/s x{o['pairs_per_s'] / s['pairs_per_s']:.2f}, "
              f"UNet calls per pair x{o['unet_calls_per_pair'] / s['unet_calls_per_pair']:.2f}, "
              f"peak memory x{o['peak_mem_mib'] / s['peak_mem_mib']:.2f}")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"spo_step_{args.shape}_{'cuda' if device.type == 'cuda' else 'cpu'}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
