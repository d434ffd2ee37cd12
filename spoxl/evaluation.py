"""Base vs tuned models on one (prompt, seed) grid: sampling, scoring, paired statistics, grids.

API
  paired_stats(base [n], tuned [n]) -> dict: means, paired difference with its standard error,
      win rate (ties count half) with a 95% Wilson interval, n
  wilson_interval(p, n, z=1.96) -> (low, high)
  evaluate(components, models, prompts, seeds, scorer, ...) -> Evaluation
      models: [(name, lora path or None)], the first is the reference every other is compared to
  Evaluation.to_json() / .table() / .save_grid(path)

Image i of the grid is prompt i // seeds drawn from seed `seed_offset + i` (spoxl.imaging: one
generator per image), the same for every model, so column s of every model block shows the same
starting noise: differences between blocks are the models', not the seeds'.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from dataclasses import dataclass, field

import torch

from spoxl.errors import SpoxlError


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion p observed over n trials."""
    if n <= 0:
        return float("nan"), float("nan")
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_stats(base: torch.Tensor, tuned: torch.Tensor) -> dict:
    """Paired comparison of two score vectors over the same (prompt, seed) items."""
    base, tuned = base.double().flatten(), tuned.double().flatten()
    if base.shape != tuned.shape or base.numel() == 0:
        raise SpoxlError(f"paired comparison needs equal, non-empty score vectors, got {base.numel()} and {tuned.numel()}")
    diff = tuned - base
    n = diff.numel()
    se = float(diff.std() / math.sqrt(n)) if n > 1 else float("nan")
    wins = float((diff > 0).sum() + 0.5 * (diff == 0).sum())
    win_rate = wins / n
    low, high = wilson_interval(win_rate, n)
    return {
        "base_mean": float(base.mean()),
        "mean": float(tuned.mean()),
        "diff_mean": float(diff.mean()),
        "diff_stderr": se,
        "win_rate": win_rate,
        "win_rate_ci95": [low, high],
        "n": n,
    }


@dataclass
class ModelResult:
    name: str
    lora: str | None
    scores: torch.Tensor  # [P, S]
    attributes: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [P, S] scaled scores
    correct: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [P, S] bool
    images: torch.Tensor | None = None  # [P * S, 3, H, W] in [0, 1], prompt-major


@dataclass
class Evaluation:
    prompts: list[str]
    seeds: int
    seed_offset: int
    scorer: str
    sampler: dict
    results: list[ModelResult]

    def summary(self) -> list[dict]:
        base = self.results[0]
        rows = []
        for r in self.results:
            row = {"model": r.name, "lora": r.lora, "mean": float(r.scores.double().mean())}
            if r is not base:
                row.update({k: v for k, v in paired_stats(base.scores, r.scores).items() if k not in ("mean",)})
            row["attributes"] = {k: float(v.double().mean()) for k, v in r.attributes.items()}
            row["accuracy"] = {k: float(v.double().mean()) for k, v in r.correct.items()}
            rows.append(row)
        return rows

    def to_json(self) -> dict:
        return {
            "prompts": self.prompts, "seeds": self.seeds, "seed_offset": self.seed_offset, "scorer": self.scorer,
            "sampler": self.sampler, "models": self.summary(),
            "per_prompt": {r.name: [float(v) for v in r.scores.double().mean(1)] for r in self.results},
            # every (prompt, seed) item's score, [prompt][seed]: paired analyses (which items a model
            # loses, by how much) without sampling again
            "per_item": {r.name: r.scores.double().tolist() for r in self.results},
        }

    def table(self) -> str:
        return self.markdown_table(self.summary())

    @staticmethod
    def markdown_table(rows: list[dict]) -> str:
        """The summary rows (first = the reference) as a markdown table."""
        base = rows[0]["model"]
        attrs = list(rows[0]["attributes"])
        accs = list(rows[0]["accuracy"])
        head = ["model", "mean score", f"diff vs {base} (+- s.e.)", "win rate [95% CI]",
                *[f"{a}" for a in attrs], *[f"{a} acc" for a in accs]]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            if "diff_mean" in r:
                lo, hi = r["win_rate_ci95"]
                diff = f"{r['diff_mean']:+.2f} +- {r['diff_stderr']:.2f}"
                win = f"{100 * r['win_rate']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"
            else:
                diff, win = "(reference)", ""
            cells = [r["model"], f"{r['mean']:.2f}", diff, win, *[f"{r['attributes'][a]:.1f}" for a in attrs],
                     *[f"{100 * r['accuracy'][a]:.0f}%" for a in accs]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def save_grid(self, path, max_prompts: int = 8, max_seeds: int = 4):
        """Rows = prompts (up to max_prompts, evenly spread over the list), column blocks = models
        (the same seeds, aligned), a white spacer column between blocks."""
        from spoxl.imaging import save_grid

        p_n, s_n = min(len(self.prompts), max_prompts), min(self.seeds, max_seeds)
        rows = sorted({round(i * (len(self.prompts) - 1) / max(1, p_n - 1)) for i in range(p_n)})
        tiles = []
        for p in rows:
            for bi, r in enumerate(self.results):
                for s in range(s_n):
                    tiles.append(r.images[p * self.seeds + s])
                if bi < len(self.results) - 1:
                    tiles.append(torch.ones_like(r.images[0]))  # white spacer column between blocks
        ncols = len(self.results) * s_n + len(self.results) - 1
        path = Path(path)
        tmp = save_grid(torch.stack(tiles), path.with_name(f".{path.stem}.{os.getpid()}.tmp.png"), ncols=ncols)
        os.replace(tmp, path)
        return path


def write_atomic(path, data: str | bytes) -> Path:
    """Write a file under a temporary name and rename it: a kill never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    (tmp.write_bytes if isinstance(data, bytes) else tmp.write_text)(data)
    os.replace(tmp, path)
    return path


def score_images(scorer, images01: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict, dict]:
    """(scores [N], per-attribute scores, per-attribute right/wrong) of final images in [0, 1]."""
    x = images01 * 2 - 1
    scores = scorer.score(x, prompts, 0).float().cpu()
    if not getattr(scorer, "reads_captions", False):  # per-attribute figures exist for toy captions only
        return scores, {}, {}
    attributes = {k: v.float().cpu() for k, v in scorer.attributes(x, prompts).items()}
    correct = {k: v.cpu() for k, v in scorer.correct(x, prompts).items()}
    return scores, attributes, correct


@torch.no_grad()
def evaluate(components, models: list[tuple[str, str | None]], prompts: list[str], seeds: int, scorer, *,
             steps: int = 20, cfg_scale: float = 5.0, eta: float = 0.0, seed_offset: int = 100_000,
             batch_size: int = 64, progress: bool = True, scorer_name: str = "") -> Evaluation:
    """Sample prompts x seeds with each model (base UNet + optional LoRA) and score them."""
    from spoxl.imaging import sample_images
    from spoxl.models.lora import load_lora_into_unet

    if seeds < 1:
        raise SpoxlError(f"--seeds must be >= 1, got {seeds}")
    if not prompts:
        raise SpoxlError("no prompts to evaluate")
    if hasattr(scorer, "check_prompts"):
        scorer.check_prompts(prompts)
    base_unet = components.unet
    batch = [p for p in prompts for _ in range(seeds)]
    results = []
    for name, lora in models:
        unet = base_unet
        if lora is not None:
            unet = copy.deepcopy(base_unet)  # each LoRA on a clean copy of the base weights
            load_lora_into_unet(unet, lora)
        components.unet = unet
        try:
            if progress:
                print(f"sampling {len(batch)} images with {name}", flush=True)
            images = sample_images(components, batch, steps=steps, cfg_scale=cfg_scale, eta=eta, seed=seed_offset,
                                   batch_size=batch_size, progress=progress)  # fmt: skip
        finally:
            components.unet = base_unet
        scores, attributes, correct = score_images(scorer, images, batch)
        shape = (len(prompts), seeds)
        results.append(ModelResult(name, lora, scores.view(shape), {k: v.view(shape) for k, v in attributes.items()},
                                   {k: v.view(shape) for k, v in correct.items()}, images))  # fmt: skip
    sampler = {"steps": steps, "cfg_scale": cfg_scale, "eta": eta}
    return Evaluation(list(prompts), seeds, seed_offset, scorer_name, sampler, results)


@torch.no_grad()
def preference_accuracy(components, unet, dataset, *, draws: int = 4, seed: int = 0, batch_size: int = 32) -> dict:
    """How far a LoRA-tuned UNet's denoising prefers each pair's winner to its loser, relative to the
    base (the same UNet with its adapters disabled): the implicit reward of Diffusion-DPO,
        margin = -[(mse_w - mse_l) - (base_mse_w - base_mse_l)]   (> 0: the tuning favours w),
    averaged over `draws` (noise, t ~ U{0..T-1}) draws shared by w and l, on held-out pairs.

    Every offline method (Diffusion-DPO, MaPO, NCP) should raise it when it learns a preference,
    and training on inverted labels should lower it: a far more sensitive read-out than sampled
    images after a short run. Returns accuracy (share of pairs with margin > 0), mean_margin and
    its standard error, n, and the per-pair margins (the same `seed` gives the same draws, so two
    tunings compare pair by pair). `dataset` items look like spoxl.data.pairs.PreferencePairDataset's.
    """
    from spoxl.data.cache import maybe_encode
    from spoxl.sampling import add_noise, alpha_bar, training_target, unet_eps

    if not hasattr(unet, "disable_adapters"):
        raise SpoxlError("preference_accuracy needs a UNet with LoRA adapters (the base is the adapters switched off)")
    scheduler = components.scheduler
    prediction_type = scheduler.config.prediction_type
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype
    g = torch.Generator().manual_seed(seed)
    margins = []
    was_training = unet.training
    unet.eval()
    try:
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = maybe_encode(components, torch.utils.data.default_collate(items), generator=g)
            x0 = torch.cat([batch["latents_w"], batch["latents_l"]]).to(device, torch.float32)
            two = lambda v: torch.cat([v, v]).to(device, dtype)  # noqa: E731
            embeds, pooled, time_ids = two(batch["prompt_embeds"]), two(batch["pooled_prompt_embeds"]), two(batch["time_ids"])
            total = torch.zeros(len(items))
            for _ in range(draws):
                noise = torch.randn(x0[: len(items)].shape, generator=g)
                t = torch.randint(0, scheduler.config.num_train_timesteps, (len(items),), generator=g)
                a = alpha_bar(scheduler, t)
                noise, t, a = torch.cat([noise, noise]).to(device), torch.cat([t, t]).to(device), torch.cat([a, a]).to(device)
                x_t = add_noise(x0, noise, a)
                target = training_target(x0, noise, a, prediction_type)
                mse = {}
                for name in ("base", "tuned"):
                    (unet.disable_adapters if name == "base" else unet.enable_adapters)()
                    out = unet_eps(unet, x_t.to(dtype), t, embeds, pooled, time_ids).float()
                    mse[name] = ((out - target) ** 2).flatten(1).mean(1).cpu()
                gap = lambda m: m[: len(items)] - m[len(items):]  # noqa: E731  (mse_w - mse_l)
                total += -(gap(mse["tuned"]) - gap(mse["base"]))
            margins.append(total / draws)
    finally:
        unet.enable_adapters()
        unet.train(was_training)
    m = torch.cat(margins).double()
    n = m.numel()
    return {"accuracy": float((m > 0).double().mean()), "mean_margin": float(m.mean()),
            "margin_stderr": float(m.std() / math.sqrt(n)) if n > 1 else float("nan"), "n": n,
            "margins": m.tolist()}
