"""Base vs tuned for an SPO run: held-out figures, grids, and report.md.

    python -m spoxl.demo_report --run runs/demo [--eval runs/demo/eval] [--seeds 8] [--seed-offset 100000]

With --eval, renders report.md from the eval.json that `spoxl eval` wrote there (what `make demo`
does: `spoxl eval` first, then this). Without it, evaluates the run itself (spoxl.evaluation, the
same code): the run's model with and without its LoRA export on the same held-out seeds (sampled
with the run's own steps, CFG and eta), scored by
the run's preference model at t = 0, on the toy world's held-out captions when the run used a toy
scorer and on the run's own prompts otherwise. Writes <run>/eval.json, grid.png (base | tuned
blocks, same seeds aligned), before.png / after.png, report.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from spoxl.errors import SpoxlError



def _run_files(run_dir: Path):
    from spoxl.config import load_config

    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise SpoxlError(f"{run_dir} has no config.yaml (is it a spoxl run directory?)")
    cfg = load_config(config_file, [])
    if cfg.method.name != "spo":
        raise SpoxlError(f"{run_dir} is a {cfg.method.name} run; the report is for SPO runs")
    lora_file = tuned_lora(run_dir, cfg)
    if not lora_file.is_file():
        raise SpoxlError(f"{run_dir} has no LoRA export ({lora_file})")
    return cfg, lora_file


def tuned_lora(run_dir: Path, cfg) -> Path:
    """The LoRA the report judges: the EMA of the trained weights when the run kept one (the
    weights a user would ship: an average of the last steps' iterates, less noisy than the last
    one), else the trained LoRA itself. `python -m spoxl.demo_report --run R --lora-path` prints it."""
    export = Path(run_dir) / "export"
    if cfg.ema.enabled:
        from spoxl.engine.export import EMA_SUBFOLDER

        export = export / EMA_SUBFOLDER
    return export / "pytorch_lora_weights.safetensors"


def build_report(run_dir: Path, seeds: int = 8, seed_offset: int = 100_000) -> dict:
    """Evaluate the run (base vs its LoRA) and write the report; returns the tuned row of the summary."""
    from spoxl.evaluation import evaluate, write_atomic
    from spoxl.imaging import save_grid
    from spoxl.methods.spo import read_prompts
    from spoxl.models.loading import load_sdxl
    from spoxl.preference_models import MODEL_KINDS, TOY_SCORERS, build_preference_model

    run_dir = Path(run_dir)
    cfg, lora_file = _run_files(run_dir)
    m = cfg.method.params
    pc = m.preference
    scorer = build_preference_model(pc.kind, path=pc.path, weights=pc.weights, allow_untrained=pc.allow_untrained,
                                    **({} if pc.kind in MODEL_KINDS else {"scale": pc.scale}))  # fmt: skip
    if pc.kind in TOY_SCORERS:
        from spoxl.toy.world import held_out_captions

        prompts = held_out_captions()
    else:
        prompts = read_prompts(m)
    components = load_sdxl(cfg.model.path)
    torch.manual_seed(0)
    ev = evaluate(components, [("base", None), ("spo", str(lora_file))], prompts, seeds, scorer, steps=m.steps,
                  cfg_scale=m.cfg_scale, eta=m.eta, seed_offset=seed_offset, progress=False, scorer_name=pc.kind)
    data = ev.to_json()
    data["model"] = cfg.model.path
    write_atomic(run_dir / "eval.json", json.dumps(data, indent=2) + "\n")
    ev.save_grid(run_dir / "grid.png")
    save_grid(ev.results[0].images, run_dir / "before.png", ncols=seeds)
    save_grid(ev.results[1].images, run_dir / "after.png", ncols=seeds)
    return write_report(run_dir, data, grid="grid.png")


def write_report(run_dir: Path, data: dict, grid: str) -> dict:
    """report.md + report.json from an eval.json's content; returns the tuned model's row."""
    from spoxl.evaluation import write_atomic

    cfg, _ = _run_files(run_dir)
    if len(data.get("models", [])) < 2:
        raise SpoxlError("the evaluation has no tuned model to compare with the base")
    tuned = data["models"][1]
    write_atomic(run_dir / "report.json", json.dumps(tuned, indent=2) + "\n")
    write_atomic(run_dir / "report.md", render_markdown(run_dir, cfg, data, grid))
    return tuned


def render_markdown(run_dir: Path, cfg, data: dict, grid: str) -> str:
    from spoxl.evaluation import Evaluation

    m = cfg.method.params
    tuned = data["models"][1]
    lo, hi = tuned["win_rate_ci95"]
    # Significant at about 95%: the paired difference is more than two standard errors from 0.
    if tuned["diff_mean"] > 2 * tuned["diff_stderr"]:
        verdict = "tuned > base"
    elif tuned["diff_mean"] < -2 * tuned["diff_stderr"]:
        verdict = "tuned < base"
    else:
        verdict = "no significant difference"
    ckpts = sorted(p.name for p in Path(cfg.checkpoint_dir).glob("step_*") if p.is_dir())
    lines = [
        "# SPO demo report",
        "",
        f"Model `{cfg.model.path}`, LoRA rank {cfg.lora.rank}, {cfg.train.max_steps} optimizer steps, "
        f"{cfg.deepspeed.config} ({cfg.deepspeed.precision}); step-aware preference model: `{m.preference.kind}` "
        f"(scale {m.preference.scale}); SPO sampler: {m.steps} DDIM steps, eta {m.eta}, CFG {m.cfg_scale}, "
        f"k={m.pool_size}, {m.num_inner_step} inner steps, branching from step {m.divert_start_step}"
        + (f" ({m.branch_repeats} times from each prompt's state)" if m.branch_repeats > 1 else "") + ", threshold "
        f"{m.threshold}; beta {m.beta}, clip {m.clip}, lr {cfg.train.lr}"
        + (f", early-step anchor weight {m.anchor_weight}" if m.anchor_weight > 0 else "")
        + (f" on {m.anchor_pairs} pairs per micro-batch" if m.anchor_weight > 0 and m.anchor_pairs
           and m.anchor_pairs < cfg.train.micro_batch_size else "")
        + (f", sampling rounds under {m.autocast} autocast" if m.autocast else "")
        + (f". The tuned model is the EMA of the LoRA weights (decay {cfg.ema.decay}), `export/ema/`."
           if cfg.ema.enabled else "."),
        "",
        f"## Held-out evaluation: {len(data['prompts'])} prompts x {data['seeds']} seeds "
        f"(from {data['seed_offset']}), scorer `{data['scorer']}`",
        "",
        f"Sampling for evaluation: {data['sampler']['steps']} DDIM steps, eta {data['sampler']['eta']}, "
        f"CFG {data['sampler']['cfg_scale']}; the same starting noise for both models on every item.",
        "",
        Evaluation.markdown_table(data["models"]),
        "",
        f"**Result: {verdict}**: paired difference {tuned['diff_mean']:+.2f} +- {tuned['diff_stderr']:.2f} "
        f"(std. error); the tuned model beats the base on {100 * tuned['win_rate']:.0f}% of "
        f"{tuned['n']} (prompt, seed) pairs (95% interval {100 * lo:.0f}-{100 * hi:.0f}%).",
        "",
        f"![base vs tuned]({grid})",
        "",
        f"`{grid}`: one row per prompt; left block the base model, right block the SPO-tuned one, the same "
        "seed in the same column of each block.",
        "",
        "## Files",
        "",
        "- `export/pytorch_lora_weights.safetensors` (diffusers) and `export/pytorch_lora_weights_kohya.safetensors`"
        + ("; the EMA weights (the tuned model above) in `export/ema/`, the same two files" if cfg.ema.enabled else ""),
        f"- checkpoints: {', '.join(f'`{c}`' for c in ckpts) or 'none'}",
        "- `train.log`, `config.yaml`, `samples/` (fixed prompts and seeds during training)",
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
    p.add_argument("--eval", default=None, help="a `spoxl eval` output folder to report (no sampling here)")
    p.add_argument("--seeds", type=int, default=8, help="held-out seeds per prompt (without --eval)")
    p.add_argument("--seed-offset", type=int, default=100_000)
    p.add_argument("--lora-path", action="store_true", help="print the LoRA file the report judges and exit")
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        if args.lora_path:
            print(_run_files(run)[1])
            return 0
        if args.eval:
            eval_file = Path(args.eval) / "eval.json"
            if not eval_file.is_file():
                raise SpoxlError(f"{eval_file} does not exist (run `spoxl eval --out {args.eval}` first)")
            grid = Path(args.eval) / "grid.png"
            rel = grid.relative_to(run) if grid.is_relative_to(run) else grid.resolve()
            try:
                data = json.loads(eval_file.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise SpoxlError(f"{eval_file} is not valid JSON ({e}); rerun spoxl eval") from None
            s = write_report(run, data, grid=str(rel))
        else:
            s = build_report(run, args.seeds, args.seed_offset)
    except SpoxlError as e:
        print(f"spoxl demo_report: error: {e}", file=sys.stderr)
        return 2
    print(f"base {s['base_mean']:.2f} -> tuned {s['mean']:.2f} (diff {s['diff_mean']:+.2f} +- {s['diff_stderr']:.2f}, "
          f"win rate {100 * s['win_rate']:.0f}%); report: {run / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
