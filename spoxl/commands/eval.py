"""`spoxl eval`: base vs tuned models on the same (prompt, seed) grid, scored, with paired figures.

    spoxl eval --model toy --lora runs/a/export/pytorch_lora_weights.safetensors [--lora B ...] \\
        --prompts held-out --seeds 8 --scorer fidelity --out runs/eval

Prints a table (mean score, paired difference vs base with its standard error, win rate vs base
with a 95% Wilson interval, per-attribute scores and accuracies for the toy scorers) and writes
OUT/eval.json with those figures and OUT/grid.png (rows = prompts, column blocks = models, the
same seeds aligned). spoxl.evaluation holds the logic.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--model", default="toy", help='"toy", "tiny" or a local diffusers SDXL folder (default toy)')
    p.add_argument("--variant", default=None, help='weight files to load, e.g. "fp16" for *.fp16.safetensors '
                   '(default: the plain weights, or the only variant a folder has)')
    p.add_argument("--lora", action="append", default=[], metavar="FILE",
                   help="a tuned model as a LoRA .safetensors (repeatable; each is compared to the base)")
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="a name per --lora for the table (default: the file's parent folder names)")
    p.add_argument("--prompts", default="held-out",
                   help='"held-out" (the toy world\'s held-out captions), "train" (its training captions), '
                        "or a prompt file (.txt lines, .json, .jsonl)")
    p.add_argument("--num-prompts", type=int, default=None,
                   help="use a fixed, seeded subset of this many prompts (default: all)")
    p.add_argument("--seeds", type=int, default=8, help="seeds per prompt (default 8)")
    p.add_argument("--seed-offset", type=int, default=100_000,
                   help="first seed; far from training rounds' seeds (default 100000)")
    p.add_argument("--scorer", default="fidelity",
                   help="preference model: fidelity, aesthetic, toy_colour/shape/position/size/background, "
                        "colour, brightness; or a model from a local path: clip (step-aware), pickscore, "
                        "laion_aesthetic, hpsv2, hpsv2.1, imagereward (with --scorer-path and, where needed, "
                        "--scorer-weights) (default fidelity)")
    p.add_argument("--scorer-scale", type=float, default=None,
                   help="score = scale * similarity (programmatic scorers only; default 100)")
    p.add_argument("--scorer-path", default=None, help="clip / pickscore / laion_aesthetic: a local CLIPModel folder "
                                                       "(clip: or tiny); hpsv2: a CLIP tokenizer folder; imagereward: "
                                                       "a bert-base-uncased tokenizer folder")
    p.add_argument("--scorer-weights", default=None, help="clip: step-aware weights (spoxl's safetensors or the official "
                                                          ".bin); laion_aesthetic: the predictor's MLP .pth; hpsv2: "
                                                          "HPS_v2(.1)_compressed.pt; imagereward: ImageReward.pt")
    p.add_argument("--allow-untrained-scorer", action="store_true",
                   help="clip: score with an untrained step-aware CLIP (it ignores the timestep; for experiments)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic given the seed)")
    p.add_argument("--batch-size", type=int, default=64, help="images per UNet batch (default 64)")
    p.add_argument("--out", required=True, help="output folder (eval.json, grid.png, table.md)")


def resolve_prompts(spec: str, num: int | None) -> list[str]:
    import random

    from spoxl.errors import SpoxlError
    from spoxl.toy import world

    if spec == "held-out":
        prompts = world.held_out_captions()
    elif spec == "train":
        prompts = [s.caption() for s in world.train_scenes()]
    else:
        from spoxl.data.prompts import load_prompts

        prompts = load_prompts(spec)
    if num is not None:
        if num < 1:
            raise SpoxlError(f"--num-prompts must be >= 1, got {num}")
        prompts = random.Random(0).sample(prompts, min(num, len(prompts)))
    return prompts


def run(args) -> int:
    from spoxl.errors import SpoxlError
    from spoxl.evaluation import evaluate, write_atomic
    from spoxl.models.loading import load_sdxl
    from spoxl.preference_models import build_preference_model

    if args.steps < 1:
        raise SpoxlError("--steps must be >= 1")
    if args.seeds < 1:
        raise SpoxlError(f"--seeds must be >= 1, got {args.seeds}")
    if args.batch_size < 1:
        raise SpoxlError("--batch-size must be >= 1")
    if args.name and len(args.name) != len(args.lora):
        raise SpoxlError(f"got {len(args.name)} --name for {len(args.lora)} --lora")
    for f in args.lora:
        if not Path(f).exists():
            raise SpoxlError(f"LoRA file {f} does not exist")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpoxlError(f"--out {out} exists and is not a folder")
    prompts = resolve_prompts(args.prompts, args.num_prompts)
    kind = args.scorer
    from spoxl.preference_models import MODEL_KINDS

    kwargs = {} if kind in MODEL_KINDS or args.scorer_scale is None else {"scale": args.scorer_scale}
    scorer = build_preference_model(kind, path=args.scorer_path, weights=args.scorer_weights,
                                    allow_untrained=args.allow_untrained_scorer, **kwargs)
    names = args.name or [_default_name(f) for f in args.lora]
    if len(set(names)) != len(names) or "base" in names:
        raise SpoxlError(f"model names must be distinct and not 'base' (got {', '.join(names)}); name each --lora with --name")
    models = [("base", None), *zip(names, args.lora)]
    components = load_sdxl(args.model, variant=args.variant)
    ev = evaluate(components, models, prompts, args.seeds, scorer, steps=args.steps, cfg_scale=args.cfg,
                  eta=args.eta, seed_offset=args.seed_offset, batch_size=args.batch_size, scorer_name=kind)
    out.mkdir(parents=True, exist_ok=True)
    data = ev.to_json()
    data["model"] = args.model
    table = ev.table()
    ev.save_grid(out / "grid.png")
    write_atomic(out / "table.md", table + "\n")
    write_atomic(out / "eval.json", json.dumps(data, indent=2) + "\n")  # last: its presence means done
    print(table)
    print(f"wrote {out / 'eval.json'}, {out / 'table.md'} and {out / 'grid.png'}")
    return 0


def _default_name(path: str) -> str:
    p = Path(path).resolve()
    # runs/<run>/export/pytorch_lora_weights.safetensors -> <run>
    parts = [q.name for q in p.parents if q.name not in ("export", "ema")]
    return parts[0] if p.is_file() and parts else p.stem
