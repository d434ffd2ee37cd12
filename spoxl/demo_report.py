"""Base vs tuned: the preference score of final images on held-out seeds, grids, and report.md.

    python -m spoxl.demo_report --run runs/demo [--seeds 16] [--seed-offset 100000]

Reads the run's config.yaml (model, prompts, scorer, sampler settings) and its LoRA export, samples
every prompt on the same held-out seeds with the base UNet and with the LoRA, scores the final
images with the run's preference model at t = 0, and writes <run>/before.png, <run>/after.png and
<run>/report.md (plus report.json with the numbers). The held-out seeds are far from anything the
training rounds drew (those come from per-round generators seeded by the run seed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from spoxl.errors import SpoxlError


@torch.no_grad()
def final_scores(components, scorer, prompts: list[str], seeds: int, seed_offset: int, *, steps: int,
                 cfg_scale: float, eta: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(scores [P, S], images [P * S, 3, H, W] in [0, 1]) for P prompts x S seeds, prompt-major."""
    from spoxl.imaging import sample_images

    batch = [p for p in prompts for _ in range(seeds)]
    # sample_images seeds image i with seed + i: prompt p, seed s -> seed_offset + p * seeds + s.
    images = sample_images(components, batch, steps=steps, cfg_scale=cfg_scale, eta=eta, seed=seed_offset,
                           batch_size=len(batch))  # fmt: skip
    scores = scorer.score(images * 2 - 1, batch, 0).float()
    return scores.view(len(prompts), seeds), images


def paired_summary(base: torch.Tensor, tuned: torch.Tensor) -> dict:
    diff = (tuned - base).flatten()
    n = diff.numel()
    se = float(diff.std() / math.sqrt(n)) if n > 1 else float("nan")
    return {
        "base_mean": float(base.mean()),
        "tuned_mean": float(tuned.mean()),
        "diff_mean": float(diff.mean()),
        "diff_stderr": se,
        "z": float(diff.mean()) / se if se and se == se and se > 0 else float("nan"),
        "win_rate": float((diff > 0).float().mean()),
        "n": n,
    }


def build_report(run_dir: Path, seeds: int = 8, seed_offset: int = 100_000) -> dict:
    from spoxl.config import load_config
    from spoxl.imaging import save_grid
    from spoxl.methods.spo import read_prompts
    from spoxl.models.loading import load_sdxl
    from spoxl.models.lora import load_lora_into_unet
    from spoxl.models.preference import build_preference_model

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise SpoxlError(f"{run_dir} has no config.yaml (is it a spoxl run directory?)")
    lora_file = run_dir / "export" / "pytorch_lora_weights.safetensors"
    if not lora_file.is_file():
        raise SpoxlError(f"{run_dir} has no LoRA export ({lora_file})")
    cfg = load_config(config_file, [])
    if cfg.method.name != "spo":
        raise SpoxlError(f"{run_dir} is a {cfg.method.name} run; the report is for SPO runs")
    m = cfg.method.params
    pc = m.preference
    scorer = build_preference_model(pc.kind, path=pc.path, weights=pc.weights,
                                    **({} if pc.kind in ("clip", "step_aware_clip") else {"scale": pc.scale}))  # fmt: skip
    prompts = read_prompts(m)
    components = load_sdxl(cfg.model.path)
    kw = dict(steps=m.steps, cfg_scale=m.cfg_scale, eta=m.eta)
    torch.manual_seed(0)
    base, base_images = final_scores(components, scorer, prompts, seeds, seed_offset, **kw)
    load_lora_into_unet(components.unet, lora_file)
    tuned, tuned_images = final_scores(components, scorer, prompts, seeds, seed_offset, **kw)

    save_grid(base_images, run_dir / "before.png", ncols=seeds)
    save_grid(tuned_images, run_dir / "after.png", ncols=seeds)
    summary = paired_summary(base, tuned)
    summary["per_prompt"] = {
        p: {"base": float(base[i].mean()), "tuned": float(tuned[i].mean())} for i, p in enumerate(prompts)
    }
    summary["seeds"] = seeds
    summary["seed_offset"] = seed_offset
    (run_dir / "report.json").write_text(json.dumps(summary, indent=2))
    (run_dir / "report.md").write_text(render_markdown(run_dir, cfg, summary))
    return summary


def render_markdown(run_dir: Path, cfg, s: dict) -> str:
    m = cfg.method.params
    ckpts = sorted(p for p in Path(cfg.checkpoint_dir).glob("step_*") if p.is_dir())
    verdict = "tuned > base" if s["diff_mean"] > 0 else "tuned <= base"
    lines = [
        "# SPO demo report",
        "",
        f"Tiny SDXL ({cfg.model.path}), LoRA rank {cfg.lora.rank}, {cfg.train.max_steps} optimizer steps, "
        f"{cfg.deepspeed.config} ({cfg.deepspeed.precision}); preference model: `{m.preference.kind}` "
        f"(scale {m.preference.scale}); sampler: {m.steps} DDIM steps, eta {m.eta}, CFG {m.cfg_scale}, "
        f"k={m.pool_size}, {m.num_inner_step} inner steps, threshold {m.threshold}.",
        "",
        f"## Preference score of final images, held-out seeds ({s['seeds']} per prompt, "
        f"from {s['seed_offset']})",
        "",
        "| | mean score |",
        "|---|---|",
        f"| base | {s['base_mean']:.3f} |",
        f"| tuned (SPO LoRA) | {s['tuned_mean']:.3f} |",
        f"| tuned - base (paired, same seeds) | {s['diff_mean']:+.3f} +- {s['diff_stderr']:.3f} (std. error), "
        f"z = {s['z']:.1f} |",
        f"| tuned beats base on the same seed | {100 * s['win_rate']:.0f}% of {s['n']} |",
        "",
        f"**Result: {verdict}.**",
        "",
        "| prompt | base | tuned |",
        "|---|---|---|",
        *[f"| {p} | {v['base']:.3f} | {v['tuned']:.3f} |" for p, v in s["per_prompt"].items()],
        "",
        "## Files",
        "",
        "- `before.png` / `after.png`: base / tuned samples, one row per prompt, the same seeds in each column",
        "- `export/pytorch_lora_weights.safetensors` (diffusers) and `export/pytorch_lora_weights_kohya.safetensors`",
        f"- checkpoints: {', '.join(f'`{c}`' for c in ckpts) or 'none'}",
        "- `train.log`, `config.yaml`",
        "",
        "## TensorBoard",
        "",
        "```",
        f"tensorboard --logdir {run_dir / 'tensorboard'}",
        "```",
        "",
        "Scalars: `train/loss`, `train/implicit_acc`, `train/log_ratio_w`, `train/log_ratio_l`, "
        "`train/clamp_frac`, `spo/acceptance/t*` (pair acceptance per timestep), `spo/final_score` "
        "(mean preference score of the final images of each sampling round); images: `samples` "
        "(fixed prompts and seeds over training).",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m spoxl.demo_report", description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="the SPO run directory (holds config.yaml and export/)")
    p.add_argument("--seeds", type=int, default=8, help="held-out seeds per prompt")
    p.add_argument("--seed-offset", type=int, default=100_000)
    args = p.parse_args(argv)
    try:
        s = build_report(Path(args.run), args.seeds, args.seed_offset)
    except SpoxlError as e:
        print(f"spoxl demo_report: error: {e}", file=sys.stderr)
        return 2
    print(f"base {s['base_mean']:.3f} -> tuned {s['tuned_mean']:.3f} "
          f"(diff {s['diff_mean']:+.3f} +- {s['diff_stderr']:.3f}, win rate {100 * s['win_rate']:.0f}%); "
          f"report: {Path(args.run) / 'report.md'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
