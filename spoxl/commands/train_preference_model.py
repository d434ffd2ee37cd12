"""Training a step-aware preference model on preference pairs: SPO's step-aware CLIP (SPM,
methods.md 1.6; `--kind spm`, the default) or LPO's latent reward model (LRM, lpo.md 2; `--kind lrm`).

Per batch of Pick-a-Pic-layout pairs (spoxl.data.pairs.PreferencePairDataset, ties kept):
  1. t ~ U{0..T-1}, one per pair;
  2. VAE-encode both images (a posterior sample) and add the SAME noise at t to both;
  3. predict x0 in one step with the frozen base UNet, CFG against the empty prompt;
  4. VAE-decode and score both with the SPM at timestep t (StepAwareCLIP.score does the resize,
     crop and CLIP normalisation);
  5. PickScore loss: cross-entropy of softmax(s_w, s_l) against the label (1, 0), or (0.5, 0.5)
     for ties plus log 0.5 so that a perfect tie costs 0.

    python -m spoxl.commands.train_preference_model --pairs pairs.jsonl --model tiny --clip tiny \
        --steps 200 --out runs/spm/spm.safetensors

LRM (`--kind lrm`): both images VAE-encoded (posterior samples), noised with INDEPENDENT noise at
one t per pair drawn from the 20-step DDIM grid {1, 51, ..., 951}; the LRM scores the noisy latents
at t; the same pair loss. It starts from the base model (`--model`: UNet up to its mid block, both
text encoders, a fresh projection) or an LRM folder (`--init`), trains all of it, and writes an LRM
folder (`--out`). `--score-table CSV` applies the official data filter (multi-preference
consistent filtering, `--filter-strategy` 1/2/3, default 2) from a table with one row per pair, in
the pair file's order: different_flag, aesthetic_gap, clipscore_gap, vqascore_gap.
`--preset lrm-sdxl`: lr 1e-5, 1000 warmup steps, 8000 steps, the decay horizon of the official
8-GPU run (the lr ends at 0.89x). `--eval-pairs` measures accuracy on held-out pairs.

The whole SPM is trained (as the official recipe), with AdamW (weight decay 0.3, gradient clip 1),
each pair weighted 1/(pairs with its caption); `--preset sd15|sdxl` takes the official lr, 500
warmup steps then linear decay, and step count; `--relabel-with PICKSCORE_DIR` relabels the pairs
as the official SDXL data (PickScore softmax gap > 0.1, else a tie); latents are VAE posterior
samples; evaluation at t = 0 scores the clean images. Not done here: feature all-gather across
GPUs (a single process) and the official 16 pairs x 4 GPUs batch (use --batch-size).
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
    # A sample of the VAE posterior, as the official trainer (not its mean), with ONE posterior
    # noise per pair shared by w and l, so the two still differ only by their content.
    vae_dtype = next(vae.parameters()).dtype
    pixels = torch.cat([pixels_w, pixels_l]).to(device, vae_dtype)
    dist = vae.encode(pixels).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    eps_vae = torch.randn(mean[:n].shape, generator=generator).to(device)
    latents = (mean + std * torch.cat([eps_vae, eps_vae])) * vae.config.scaling_factor
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


@torch.no_grad()
def noisy_latents(components, pixels_w, pixels_l, prompts, t, *, cfg_scale: float = 5.0,
                  generator: torch.Generator | None = None):  # fmt: skip
    """(z_w, z_l): the LRM's training inputs (lpo.md 2). Both images VAE-encoded (a posterior
    sample each) and noised at the pair's t with INDEPENDENT noise per image, as the official
    LRM trainer; `prompts` and `cfg_scale` are unused (the signature of predicted_x0_images)."""
    vae, sched = components.vae, components.scheduler
    device = next(vae.parameters()).device
    vae_dtype = next(vae.parameters()).dtype
    n = pixels_w.shape[0]
    dist = vae.encode(torch.cat([pixels_w, pixels_l]).to(device, vae_dtype)).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    latents = (mean + std * torch.randn(mean.shape, generator=generator).to(device)) * vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator).to(device)
    a = sampling.alpha_bar(sched, torch.as_tensor(t).long().repeat(2)).to(device)
    z = sampling.add_noise(latents, noise, a)
    return z[:n], z[n:]


def grid_timesteps(scheduler, steps: int = 20) -> torch.Tensor:
    """The DDIM inference grid the LRM is trained on (SDXL, 20 steps: 1, 51, ..., 951)."""
    return sampling.inference_timesteps(scheduler, steps).flip(0)


def spm_loss(model, images_w, images_l, prompts, t, tie: torch.Tensor, examples_per_prompt=None):
    """(loss, accuracy on non-tie pairs): the PickScore pair loss at timestep(s) t. With
    examples_per_prompt ([B], how many pairs the dataset holds for each pair's caption) the
    per-pair losses are weighted 1/count, normalised over the batch, as the official trainer
    (prompts with many pairs would otherwise dominate); without it, the plain mean."""
    s_w = model.score(images_w, list(prompts), t)
    s_l = model.score(images_l, list(prompts), t)
    logp = F.log_softmax(torch.stack([s_w, s_l], dim=1), dim=1)
    tie = tie.to(logp.device).float()
    target = torch.stack([1 - 0.5 * tie, 0.5 * tie], dim=1)
    per_pair = -(target * logp).sum(1) + tie * math.log(0.5)
    if examples_per_prompt is None:
        loss = per_pair.mean()
    else:
        weight = 1.0 / torch.as_tensor(examples_per_prompt, dtype=per_pair.dtype, device=per_pair.device)
        loss = (per_pair * weight / weight.sum()).sum()
    decided = tie == 0
    acc = ((s_w > s_l).float()[decided].mean() if decided.any() else torch.tensor(float("nan"))).detach()
    return loss, acc


def _batches(dataset, batch_size: int, generator: torch.Generator, counts: dict | None = None):
    while True:
        order = torch.randperm(len(dataset), generator=generator).tolist()
        for s in range(0, len(order) - batch_size + 1, batch_size):
            items = [dataset[i] for i in order[s : s + batch_size]]
            captions = [it["caption"] for it in items]
            yield (torch.stack([it["pixels_w"] for it in items]), torch.stack([it["pixels_l"] for it in items]),
                   captions, torch.tensor([bool(it["tie"]) for it in items]),
                   None if counts is None else torch.tensor([counts[c] for c in captions]))  # fmt: skip


def examples_per_prompt(dataset) -> dict:
    """caption -> number of pairs with it (the official trainer's per-prompt weighting)."""
    from collections import Counter

    return dict(Counter(examples_source_captions(dataset)))


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to the full rate over warmup_steps, then linear decay to 0 at total_steps."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@torch.no_grad()
def evaluate(model, components, dataset, timesteps=EVAL_TIMESTEPS, seed: int = 1234, to_inputs=None) -> dict[int, float]:
    """Pairwise accuracy (non-tie pairs) of the model at fixed timesteps, the same noise draws for
    every model. to_inputs None: the SPM's (predicted x0 images; the clean images at t = 0);
    else to_inputs(components, pixels_w, pixels_l, prompts, t, generator=) (the LRM's noisy_latents)."""
    model.eval()
    items = [dataset[i] for i in range(len(dataset))]
    pw = torch.stack([it["pixels_w"] for it in items])
    pl = torch.stack([it["pixels_l"] for it in items])
    prompts = [it["caption"] for it in items]
    tie = torch.tensor([bool(it["tie"]) for it in items])
    out = {}
    for t in timesteps:
        gen = torch.Generator().manual_seed(seed + t)
        if to_inputs is not None:
            iw, il = to_inputs(components, pw, pl, prompts, torch.full((len(items),), t), generator=gen)
        elif t == 0:  # the official evaluation scores the clean images at t = 0
            iw, il = pw, pl
        else:
            iw, il = predicted_x0_images(components, pw, pl, prompts, torch.full((len(items),), t), generator=gen)
        out[t] = float(spm_loss(model, iw, il, prompts, t, tie)[1])
    return out


def train_spm(model, components, dataset, *, steps: int, batch_size: int = 4, lr: float = 1e-5,
              weight_decay: float = 0.3, cfg_scale: float = 5.0, seed: int = 0, log=None,
              to_images=None, warmup_steps: int = 0, decay: bool = False,
              weight_by_prompt: bool = True, timestep_grid: torch.Tensor | None = None,
              decay_steps: int | None = None) -> list[dict]:  # fmt: skip
    """Train `model` (a StepAwareCLIP or a LatentRewardModel) in place; returns per-step {loss, acc, t, lr}.

    `to_images(components, pixels_w, pixels_l, prompts, t, cfg_scale=, generator=)` makes the SPM's
    inputs; default predicted_x0_images (tests pass the clean pixels through instead).
    warmup_steps / decay: linear warmup, then (decay) linear decay to 0 at `steps` (the official
    schedule); weight_by_prompt: each pair weighted 1/(pairs with its caption), as the official.
    timestep_grid: each pair's t drawn from these (the LRM's DDIM grid), else U{0..T-1};
    decay_steps: where the linear decay reaches 0 (default `steps`; the official LRM run's is
    steps x 8 GPUs, so its lr ends at 0.89x)."""
    to_images = to_images or predicted_x0_images
    if len(dataset) < batch_size:
        raise SpoxlError(f"SPM training: {len(dataset)} pairs is fewer than one batch of {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, warmup_steps, decay_steps or steps) if decay
        else min(1.0, (step + 1) / max(1, warmup_steps)))
    history = []
    batches = _batches(dataset, batch_size, gen, examples_per_prompt(dataset) if weight_by_prompt else None)
    T = components.scheduler.config.num_train_timesteps
    for step in range(steps):
        model.train()
        pw, pl, prompts, tie, counts = next(batches)
        if timestep_grid is None:
            t = torch.randint(0, T, (pw.shape[0],), generator=gen)
        else:
            t = timestep_grid[torch.randint(0, len(timestep_grid), (pw.shape[0],), generator=gen)]
        iw, il = to_images(components, pw, pl, prompts, t, cfg_scale=cfg_scale, generator=gen)
        loss, acc = spm_loss(model, iw, il, prompts, t, tie, counts)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        current_lr = opt.param_groups[0]["lr"]
        opt.step()
        schedule.step()
        history.append({"loss": float(loss.detach()), "acc": float(acc), "t": float(t.float().mean()), "lr": current_lr})
        if log is not None:
            log(step, history[-1])
    model.eval()
    return history


class RelabelledPairs:
    """A pair dataset relabelled by a reward model, as the official SDXL SPM data: each pair's
    winner is the image the scorer prefers when the 2-way softmax gap of its scores exceeds
    `threshold` (0.1), else the pair is a tie. Scored once, up front, on the clean images."""

    def __init__(self, dataset, scorer, threshold: float = 0.1, batch_size: int = 16, progress: bool = True):
        from tqdm.auto import tqdm

        from spoxl.spo.pool_sampler import pair_gap

        self.dataset = dataset
        self.swap, self.tie = [], []
        for start in tqdm(range(0, len(dataset), batch_size), desc="relabel", disable=not progress):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            prompts = [it["caption"] for it in items]
            with torch.no_grad():
                s_w = scorer.score(torch.stack([it["pixels_w"] for it in items]), prompts, 0).float().cpu()
                s_l = scorer.score(torch.stack([it["pixels_l"] for it in items]), prompts, 0).float().cpu()
            gap = pair_gap(torch.maximum(s_w, s_l), torch.minimum(s_w, s_l))
            self.swap += (s_l > s_w).tolist()
            self.tie += (gap <= threshold).tolist()

    def __len__(self) -> int:
        return len(self.dataset)

    def captions(self) -> list[str]:
        return examples_source_captions(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.dataset[i])
        if self.swap[i] and not self.tie[i]:
            item["pixels_w"], item["pixels_l"] = item["pixels_l"], item["pixels_w"]
        item["tie"] = bool(self.tie[i])
        return item


def examples_source_captions(dataset) -> list[str]:
    return dataset.captions() if hasattr(dataset, "captions") else [dataset[i]["caption"] for i in range(len(dataset))]


# The official recipes (official-differences.md 9; lpo.md 2): lr, warmup then linear decay, steps.
# lrm-sdxl: DeepSpeed's WarmupDecayLR over max_steps x 8 GPUs (decay_horizon), so the lr ends at 0.89x.
PRESETS = {"sd15": {"lr": 3e-6, "warmup": 500, "steps": 8000}, "sdxl": {"lr": 1e-6, "warmup": 500, "steps": 7000},
           "lrm-sdxl": {"lr": 1e-5, "warmup": 1000, "steps": 8000, "decay_horizon": 8, "resolution": 1024}}
LRM_EVAL_SUBSET = 256  # training pairs the LRM is evaluated on when no --eval-pairs are given
LRM_EVAL_TIMESTEPS = (1, 251, 501, 751, 951)  # on the 20-step grid the LRM is trained on


def add_arguments(p) -> None:
    """The trainer's flags (`spoxl train-preference-model` and `python -m spoxl.commands.train_preference_model`)."""
    p.add_argument("--kind", choices=("spm", "lrm"), default="spm",
                   help="spm (default): SPO's step-aware CLIP; lrm: LPO's latent reward model")
    p.add_argument("--pairs", required=True, help="Pick-a-Pic-layout pair table (.jsonl / .parquet)")
    p.add_argument("--eval-pairs", default=None,
                   help="held-out pairs to report accuracy on before and after (default: the training pairs)")
    p.add_argument("--init", default=None, help="lrm: an LRM folder to continue from (default: a fresh one from --model)")
    p.add_argument("--score-table", default=None,
                   help="lrm: the official data filter's score table (CSV, one row per pair: different_flag, "
                        "aesthetic_gap, clipscore_gap, vqascore_gap)")
    p.add_argument("--filter-strategy", type=int, choices=(1, 2, 3), default=2,
                   help="lrm: the score-table rule (default 2, the released recipe)")
    p.add_argument("--model", default="tiny", help="the frozen base model: tiny or a local SDXL folder")
    p.add_argument("--clip", default="tiny", help="CLIPModel folder to start from (e.g. PickScore_v1), or tiny")
    p.add_argument("--resolution", type=int, default=None,
                   help="image side the pairs are centre-cropped to (default 64; the lrm-sdxl preset's 1024)")
    p.add_argument("--device", default=None, help="lrm: where to train (default cuda when available, else cpu)")
    p.add_argument("--freeze-text-encoders", action="store_true",
                   help="lrm: train the UNet part and the head only (the official trains the text encoders too)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="the official recipe's lr, warmup (then linear decay) and steps: sd15 3e-6/500/8000, "
                        "sdxl 1e-6/500/7000, lrm-sdxl 1e-5/1000/8000 (explicit flags override)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 100, or the preset's)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step (default 4)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-5, or the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 0, or the preset's 500)")
    p.add_argument("--relabel-with", default=None,
                   help="a PickScore CLIPModel folder: relabel the pairs by it first (softmax gap > 0.1, else a tie), "
                        "as the official SDXL SPM data")
    p.add_argument("--seed", type=int, default=0, help="seed of the order, timesteps and noise (default 0)")
    p.add_argument("--out", required=True, help="where to write the SPM weights (.safetensors), or the LRM folder")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m spoxl.commands.train_preference_model", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except SpoxlError as e:
        print(f"spoxl train-preference-model: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    """Train an SPM as the flags say; SpoxlError for bad input (the caller prints it)."""
    from spoxl.data.pairs import PreferencePairDataset
    from spoxl.models.loading import load_sdxl
    from spoxl.preference_models import build_preference_model

    preset = PRESETS.get(args.preset, {})
    steps = args.steps if args.steps is not None else preset.get("steps", 100)
    lr = args.lr if args.lr is not None else preset.get("lr", 1e-5)
    warmup = args.warmup if args.warmup is not None else preset.get("warmup", 0)
    if steps < 1 or lr <= 0 or warmup < 0:
        raise SpoxlError(f"--steps must be >= 1, --lr > 0 and --warmup >= 0 (got {steps}, {lr}, {warmup})")
    if (args.kind == "lrm") != (args.preset == "lrm-sdxl") and args.preset is not None:
        raise SpoxlError(f"--preset {args.preset} is for --kind {'lrm' if args.preset == 'lrm-sdxl' else 'spm'}")
    if args.kind == "spm" and (args.init or args.score_table):
        raise SpoxlError("--init and --score-table are for --kind lrm")
    if args.kind == "lrm" and (args.relabel_with or args.clip != "tiny"):
        raise SpoxlError("--relabel-with and --clip are for --kind spm (the LRM is built from --model)")
    if args.kind == "spm" and (args.device or args.freeze_text_encoders):
        raise SpoxlError("--device and --freeze-text-encoders are for --kind lrm")
    resolution = args.resolution or preset.get("resolution", 64)
    dataset = PreferencePairDataset(args.pairs, resolution, drop_ties=False, seed=args.seed)
    eval_set = PreferencePairDataset(args.eval_pairs, resolution, drop_ties=False) if args.eval_pairs else dataset
    if args.kind == "lrm":
        return _run_lrm(args, dataset, eval_set, steps=steps, lr=lr, warmup=warmup, preset=preset)
    if args.relabel_with:
        dataset = RelabelledPairs(dataset, build_preference_model("pickscore", path=args.relabel_with))
    components = load_sdxl(args.model)
    model = build_preference_model("clip", path=args.clip, allow_untrained=True)  # what training starts from
    before = evaluate(model, components, eval_set)
    train_spm(model, components, dataset, steps=steps, batch_size=args.batch_size, lr=lr, seed=args.seed,
              warmup_steps=warmup, decay=args.preset is not None,
              log=lambda s, h: print(f"step {s + 1} loss {h['loss']:.4f} acc {h['acc']:.2f} lr {h['lr']:.2e}")
              if (s + 1) % 10 == 0 else None)  # fmt: skip
    after = evaluate(model, components, eval_set)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    print("pairwise accuracy by timestep, before -> after: "
          + ", ".join(f"t={t}: {before[t]:.2f} -> {after[t]:.2f}" for t in before))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


def train_lrm(model, components, dataset, eval_set, *, steps: int, batch_size: int = 4, lr: float = 1e-5,
              warmup: int = 0, decay: bool = False, decay_horizon: int = 1, seed: int = 0, log=None,
              eval_timesteps=LRM_EVAL_TIMESTEPS) -> dict:  # fmt: skip
    """Train an LRM in place on `dataset` (lpo.md 2); accuracy on `eval_set` by timestep before
    and after, and the per-step history."""
    grid = grid_timesteps(components.scheduler)
    acc = lambda: evaluate(model, components, eval_set, eval_timesteps, to_inputs=noisy_latents)  # noqa: E731
    before = acc()
    history = train_spm(model, components, dataset, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                        to_images=noisy_latents, warmup_steps=warmup, decay=decay, timestep_grid=grid,
                        decay_steps=steps * decay_horizon, log=log)  # fmt: skip
    return {"before": before, "after": acc(), "history": history}


def _run_lrm(args, dataset, eval_set, *, steps: int, lr: float, warmup: int, preset: dict) -> int:
    from spoxl.data.score_filter import ScoreFilteredPairs
    from spoxl.models.loading import load_sdxl
    from spoxl.models.lrm import LatentRewardModel
    from spoxl.paths import check_can_create

    check_can_create(Path(args.out), "--out")
    if args.score_table:
        n = len(dataset)
        dataset = ScoreFilteredPairs(dataset, args.score_table, args.filter_strategy)
        print(f"score table: strategy {args.filter_strategy} keeps {len(dataset)} of {n} pairs")
    if eval_set is dataset and len(dataset) > LRM_EVAL_SUBSET:  # evaluate() holds its set in memory at once
        from torch.utils.data import Subset

        eval_set = Subset(dataset, range(LRM_EVAL_SUBSET))
        print(f"no --eval-pairs: accuracy reported on the first {LRM_EVAL_SUBSET} training pairs")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    components = load_sdxl(args.model)
    components.to(device)
    if args.init:
        model = LatentRewardModel.from_folder(args.init, tokenizers=(components.tokenizer, components.tokenizer_2))
        if args.freeze_text_encoders:
            model.freeze_text_encoders()
    else:
        model = LatentRewardModel.from_components(components, train_text_encoders=not args.freeze_text_encoders)
    model.to(device)
    out = train_lrm(model, components, dataset, eval_set, steps=steps, batch_size=args.batch_size, lr=lr, warmup=warmup,
                    decay=args.preset is not None, decay_horizon=preset.get("decay_horizon", 1), seed=args.seed,
                    log=lambda s, h: print(f"step {s + 1} loss {h['loss']:.4f} acc {h['acc']:.2f} lr {h['lr']:.2e}")
                    if (s + 1) % 10 == 0 else None)  # fmt: skip
    model.save(args.out)
    print("pairwise accuracy by timestep, before -> after: "
          + ", ".join(f"t={t}: {out['before'][t]:.2f} -> {out['after'][t]:.2f}" for t in out["before"]))  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
