"""The per-step scoring cost of LPO's latent reward model against SPO's decode + CLIP path, on the
same candidates (lpo.md 3: LPO scores the k candidates x_{t-1} as latents; SPO predicts each
candidate's x0 with the UNet, VAE-decodes it and scores it with the step-aware CLIP).

    python benchmarks/lrm_cost.py --size toy              # the toy world's models (seconds)
    python benchmarks/lrm_cost.py --size sdxl --candidates 1 --resolution 1024   # SDXL's architectures

Per scoring of `--candidates` candidates (one prompt's pool), median of `--repeats` timed runs after
one warm-up, no grad, fp32 on this machine's CPU threads:
  lrm_s      the LRM: the UNet's down and mid blocks on 2 x k rows (prompt and "", visual feature
             enhancement), projection, cosine; its text features are computed once per round
             (the same prompts at every step) and cached, so they are not in this per-step figure
  decode_s   SPO: VAE decode of the k predicted x0
  clip_s     SPO: the step-aware CLIP on the k decoded images
  unet_x0_s  SPO: the UNet call predicting the k candidates' x0 with CFG (2 x k rows). In SPO's
             per-step branching it also yields the continued candidate's next eps, which LPO
             gets from a UNet call on ONE candidate (2 rows): the extra is (k - 1) / k of it.
The ratio columns are SPO's path over the LRM, measured in the same run. `--size sdxl` builds the
real architectures with random weights (SDXL UNet/VAE/text encoders; the step-aware CLIP on
CLIP ViT-H/14, PickScore's architecture): the weights do not change the cost. Appends a row to
benchmarks/results/lrm_cost_<device>.csv.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def vit_h14_clip():
    """A CLIPModel of PickScore_v1's architecture (CLIP ViT-H/14), random weights."""
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14),
        projection_dim=1024,
    )  # fmt: skip
    return CLIPModel(config)


def build(size: str):
    """(components, a function making the LRM, the step-aware CLIP). At SDXL size the LRM is made
    from the policy's own UNet, truncated in place AFTER the UNet is timed: one 10 GB fp32 UNet in
    memory, not two."""
    from spoxl.models.lrm import LatentRewardModel, truncate_unet
    from spoxl.models.preference import StepAwareCLIP

    if size == "toy":
        from spoxl.models.loading import load_sdxl

        comps = load_sdxl("toy")
        from spoxl.preference_models import build_lrm

        return comps, lambda: build_lrm("toy", components=comps), StepAwareCLIP.tiny(image_size=64)
    from spoxl.models.random_sdxl import build_random_sdxl
    from spoxl.models.tiny import tiny_clip_tokenizer

    comps = build_random_sdxl(0)

    def make_lrm():
        unet, comps.unet = comps.unet, None
        return LatentRewardModel(truncate_unet(unet), comps.text_encoder, comps.text_encoder_2, comps.tokenizer,
                                 comps.tokenizer_2).float().eval()  # fmt: skip

    return comps, make_lrm, StepAwareCLIP(vit_h14_clip(), tiny_clip_tokenizer()).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def main(argv=None) -> int:
    from spoxl import sampling
    from spoxl.models.text import encode_with_negative, make_time_ids

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("toy", "sdxl"), default="toy")
    p.add_argument("--candidates", type=int, default=4, help="k, the pool scored per step (default 4)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the model's native)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="CSV to append to (default benchmarks/results/lrm_cost_cpu.csv; the committed figures: lrm_cost_cpu2.csv)")
    args = p.parse_args(argv)
    k = args.candidates
    comps, make_lrm, spm = build(args.size)
    res = args.resolution or 8 * comps.unet.config.sample_size
    prompt = "a small red circle at the top left on a black background" if args.size == "toy" else "a photo of a cat"
    prompts = [prompt] * k
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(k, 4, res // 8, res // 8, generator=g)
    t = 501
    cond, uncond = encode_with_negative(comps, prompts)
    time_ids = make_time_ids(k, (res, res))
    a = sampling.alpha_bar(comps.scheduler, t)

    def unet_x0():
        out = sampling.guided_output(comps.unet, latents, t, cond, uncond, time_ids, 5.0)
        return sampling.split_prediction(out, latents, a)[0]

    x0 = unet_x0()
    row = {"size": args.size, "candidates": k, "resolution": res, "threads": torch.get_num_threads(),
           "unet_x0_s": timed(unet_x0, args.repeats)}  # fmt: skip
    images = sampling.decode_latents(comps.vae, x0)
    row["decode_s"] = timed(lambda: sampling.decode_latents(comps.vae, x0), args.repeats)
    row["clip_s"] = timed(lambda: spm.score(images, prompts, t), args.repeats)
    lrm = make_lrm()
    row["lrm_s"] = timed(lambda: lrm.score(latents, prompts, t), args.repeats)
    row["spo_decode_clip_over_lrm"] = (row["decode_s"] + row["clip_s"]) / row["lrm_s"]
    row["spo_step_extra_over_lrm"] = (row["decode_s"] + row["clip_s"] + row["unet_x0_s"] * (k - 1) / k) / row["lrm_s"]
    for key, value in row.items():
        print(f"{key:26s} {value:.4f}" if isinstance(value, float) else f"{key:26s} {value}")
    out = Path(args.out or REPO / "benchmarks" / "results" / "lrm_cost_cpu.csv")
    new = not out.exists()
    with open(out, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()})
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
