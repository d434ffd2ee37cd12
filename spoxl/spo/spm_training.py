"""Training the step-aware preference model (SPM, methods.md 1.6) on preference pairs.

Per batch of Pick-a-Pic-layout pairs (spoxl.data.pairs.PreferencePairDataset, ties kept):
  1. t ~ U{0..T-1}, one per pair;
  2. VAE-encode both images (latent mean) and add the SAME noise at t to both;
  3. predict x0 in one step with the frozen base UNet, CFG against the empty prompt;
  4. VAE-decode and score both with the SPM at timestep t (StepAwareCLIP.score does the resize,
     crop and CLIP normalisation);
  5. PickScore loss: cross-entropy of softmax(s_w, s_l) against the label (1, 0), or (0.5, 0.5)
     for ties plus log 0.5 so that a perfect tie costs 0.

    python -m spoxl.spo.spm_training --pairs pairs.jsonl --model tiny --clip tiny \
        --steps 200 --out runs/spm/spm.safetensors

The whole SPM is trained (as the official recipe), with AdamW (weight decay 0.3). Not done here:
per-prompt example weighting and feature all-gather across GPUs (single process).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from spoxl import sampling
from spoxl.errors import SpoxlError
from spoxl.models.text import encode_prompts, make_time_ids, negative_embeds

EVAL_TIMESTEPS = (0, 251, 501, 701, 951)  # where the official recipe reports pairwise accuracy


@torch.no_grad()
def predicted_x0_images(components, pixels_w, pixels_l, prompts, t, *, cfg_scale: float = 5.0,
                        generator: torch.Generator | None = None):  # fmt: skip
    """(images_w, images_l) in [-1, 1]: both pairs noised with the same noise at t, x0 predicted
    in one CFG step by the frozen base UNet, decoded."""
    unet, vae, sched = components.unet, components.vae, components.scheduler
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    n = pixels_w.shape[0]
    # The latent distribution's mean (deterministic): w and l then differ only by their content.
    vae_dtype = next(vae.parameters()).dtype
    pixels = torch.cat([pixels_w, pixels_l]).to(device, vae_dtype)
    latents = vae.encode(pixels).latent_dist.mean.float() * vae.config.scaling_factor
    noise = torch.randn(latents[:n].shape, generator=generator).to(device)
    t2 = torch.as_tensor(t).long().repeat(2)
    a = sampling.alpha_bar(sched, t2).to(device)
    x_t = sampling.add_noise(latents, torch.cat([noise, noise]), a)
    cond = encode_prompts(components, list(prompts) * 2).to(device, dtype)
    uncond = negative_embeds(components, 2 * n).to(device, dtype)
    res = pixels_w.shape[-1]
    time_ids = make_time_ids(2 * n, (res, res), device=device, dtype=dtype)
    out = sampling.guided_output(unet, x_t.to(dtype), t2.to(device), cond, uncond, time_ids, cfg_scale)
    x0, _ = sampling.split_prediction(out, x_t, a, sched.config.prediction_type)
    images = sampling.decode_latents(vae, x0)
    return images[:n], images[n:]


def spm_loss(model, images_w, images_l, prompts, t, tie: torch.Tensor):
    """(loss, accuracy on non-tie pairs): the PickScore pair loss at timestep(s) t."""
    s_w = model.score(images_w, list(prompts), t)
    s_l = model.score(images_l, list(prompts), t)
    logp = F.log_softmax(torch.stack([s_w, s_l], dim=1), dim=1)
    tie = tie.to(logp.device).float()
    target = torch.stack([1 - 0.5 * tie, 0.5 * tie], dim=1)
    loss = (-(target * logp).sum(1) + tie * math.log(0.5)).mean()
    decided = tie == 0
    acc = ((s_w > s_l).float()[decided].mean() if decided.any() else torch.tensor(float("nan"))).detach()
    return loss, acc


def _batches(dataset, batch_size: int, generator: torch.Generator):
    while True:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        for s in range(0, len(order) - batch_size + 1, batch_size):
            items = [dataset[i] for i in order[s : s + batch_size]]
            yield (torch.stack([it["pixels_w"] for it in items]), torch.stack([it["pixels_l"] for it in items]),
                   [it["caption"] for it in items], torch.tensor([bool(it["tie"]) for it in items]))  # fmt: skip


@torch.no_grad()
def evaluate(model, components, dataset, timesteps=EVAL_TIMESTEPS, seed: int = 1234) -> dict[int, float]:
    """Pairwise accuracy (non-tie pairs) of the SPM at fixed timesteps, same noise per pair."""
    model.eval()
    items = [dataset[i] for i in range(len(dataset))]
    pw = torch.stack([it["pixels_w"] for it in items])
    pl = torch.stack([it["pixels_l"] for it in items])
    prompts = [it["caption"] for it in items]
    tie = torch.tensor([bool(it["tie"]) for it in items])
    out = {}
    for t in timesteps:
        gen = torch.Generator().manual_seed(seed + t)
        iw, il = predicted_x0_images(components, pw, pl, prompts, torch.full((len(items),), t), generator=gen)
        out[t] = float(spm_loss(model, iw, il, prompts, t, tie)[1])
    return out


def train_spm(model, components, dataset, *, steps: int, batch_size: int = 4, lr: float = 1e-5,
              weight_decay: float = 0.3, cfg_scale: float = 5.0, seed: int = 0, log=None,
              to_images=None) -> list[dict]:  # fmt: skip
    """Train `model` (a StepAwareCLIP) in place; returns per-step {loss, acc, t}.

    `to_images(components, pixels_w, pixels_l, prompts, t, cfg_scale=, generator=)` makes the SPM's
    inputs; default predicted_x0_images (tests pass the clean pixels through instead)."""
    to_images = to_images or predicted_x0_images
    if len(dataset) < batch_size:
        raise SpoxlError(f"SPM training: {len(dataset)} pairs is fewer than one batch of {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    history = []
    batches = _batches(dataset, batch_size, gen)
    T = components.scheduler.config.num_train_timesteps
    for step in range(steps):
        model.train()
        pw, pl, prompts, tie = next(batches)
        t = torch.randint(0, T, (pw.shape[0],), generator=gen)
        iw, il = to_images(components, pw, pl, prompts, t, cfg_scale=cfg_scale, generator=gen)
        loss, acc = spm_loss(model, iw, il, prompts, t, tie)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append({"loss": float(loss.detach()), "acc": float(acc), "t": float(t.float().mean())})
        if log is not None:
            log(step, history[-1])
    model.eval()
    return history


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m spoxl.spo.spm_training", description=__doc__.splitlines()[0])
    p.add_argument("--pairs", required=True, help="Pick-a-Pic-layout pair table (.jsonl / .parquet)")
    p.add_argument("--model", default="tiny", help="the frozen base model: tiny or a local SDXL folder")
    p.add_argument("--clip", default="tiny", help="CLIPModel folder to start from (e.g. PickScore_v1), or tiny")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where to write the SPM weights (.safetensors)")
    args = p.parse_args(argv)
    try:
        from spoxl.data.pairs import PreferencePairDataset
        from spoxl.models.loading import load_sdxl
        from spoxl.models.preference import build_preference_model

        dataset = PreferencePairDataset(args.pairs, args.resolution, drop_ties=False, seed=args.seed)
        components = load_sdxl(args.model)
        model = build_preference_model("clip", path=args.clip, allow_untrained=True)  # what training starts from
        before = evaluate(model, components, dataset)
        train_spm(model, components, dataset, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  seed=args.seed, log=lambda s, h: print(f"step {s + 1} loss {h['loss']:.4f} acc {h['acc']:.2f}")
                  if (s + 1) % 10 == 0 else None)  # fmt: skip
        after = evaluate(model, components, dataset)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        model.save(args.out)
    except SpoxlError as e:
        print(f"spoxl spm_training: error: {e}", file=sys.stderr)
        return 2
    print("pairwise accuracy by timestep, before -> after: "
          + ", ".join(f"t={t}: {before[t]:.2f} -> {after[t]:.2f}" for t in before))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
