"""`spoxl toy`: the toy world (spoxl.toy).

    spoxl toy pretrain --out DIR     make the pretrained toy model from nothing (CPU, ~22 min on 2 cores)
    spoxl toy export DIR             copy the shipped pretrained toy model out as a diffusers folder
    spoxl toy pairs --model toy --n N --scorer fidelity --out pairs.parquet
                                     an offline preference set from the model's own samples
    spoxl toy pairs --source counterfactual --n N --out pairs.parquet
                                     exact renderings against one-attribute-wrong ones (no model)
    spoxl toy lrm --out DIR          train the toy world's latent reward model (LPO's preference model)
    spoxl toy lrm --source candidates --out DIR
                                     ... taught on pool candidates ordered by the exact scorer
    spoxl toy captions [--split train|held-out]   print the world's captions
"""

from __future__ import annotations

import shutil
from pathlib import Path


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="toy_command", metavar="SUBCOMMAND", required=True)

    pre = sub.add_parser("pretrain", help="render the world, train the toy VAE, pretrain the UNet with spoxl's engine")
    pre.add_argument("--out", required=True, help="folder to write the toy model to")
    pre.add_argument("--images", type=int, default=8192, help="rendered training images (default 8192)")
    pre.add_argument("--vae-steps", type=int, default=2500, help="VAE optimizer steps (default 2500)")
    pre.add_argument("--unet-steps", type=int, default=1500, help="UNet optimizer steps (default 1500)")
    pre.add_argument("--num-gpus", type=int, default=2, help="ranks (CPU processes) for the UNet run (default 2)")
    pre.add_argument("--seed", type=int, default=0, help="seed of the data and the initial weights (default 0)")
    pre.add_argument("--config", default=None, help="the SFT recipe (default configs/toy_pretrain.yaml)")
    pre.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a value of the SFT recipe (repeatable)")

    exp = sub.add_parser("export", help="copy the shipped toy model out as a diffusers folder")
    exp.add_argument("out", help="folder to write (created; must be empty or absent)")

    pairs = sub.add_parser("pairs", help="offline preference pairs (Pick-a-Pic parquet): the model's own samples "
                                         "labelled by a scorer, or exact counterfactual renderings")
    pairs.add_argument("--source", choices=("samples", "counterfactual"), default="samples",
                       help="samples (default): the model's samples, scored; counterfactual: each caption's exact "
                            "rendering against the same rendering with one attribute wrong (no model, labels exact)")
    pairs.add_argument("--attributes", default="colour,shape,position,size,background",
                       help="counterfactual: the attributes a loser may get wrong, comma-separated (default all five)")
    pairs.add_argument("--model", default="toy", help='"toy" or a local diffusers SDXL folder (default toy)')
    pairs.add_argument("--n", type=int, required=True, help="pairs to keep")
    pairs.add_argument("--scorer", default="fidelity", help="the labelling scorer (default fidelity)")
    pairs.add_argument("--margin", type=float, default=1.0,
                       help="score difference below which a pair is a tie and dropped (scaled units; default 1.0)")
    pairs.add_argument("--prompts", default="train",
                       help='"train" (the toy training captions; held-out ones stay for eval), "held-out" or a prompt file')
    pairs.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    pairs.add_argument("--cfg", type=float, default=5.0, help="CFG scale (default 5)")
    pairs.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0)")
    pairs.add_argument("--seed", type=int, default=0, help="seed of captions, noise and order (default 0)")
    pairs.add_argument("--out", required=True, help="the .parquet file to write")

    lrm = sub.add_parser("lrm", help="train the toy world's latent reward model (LPO) on exact counterfactual pairs, "
                                     "or on pool candidates ordered by the exact scorer")
    lrm.add_argument("--out", required=True, help="the LRM folder to write (must be empty or absent)")
    lrm.add_argument("--source", choices=("counterfactual", "candidates"), default="counterfactual",
                     help="counterfactual (default; the shipped spoxl/toy/lrm): exact renderings against one-attribute-"
                          "wrong ones; candidates: candidates of the toy model's own pools (best vs worst, or every two with "
                          "--pairs-per-pool all), ordered by the exact fidelity scorer (spoxl.commands.toy_candidate_lrm)")
    from spoxl.commands.toy_lrm import CANDIDATE_DEFAULTS, DEFAULTS

    for name in dict.fromkeys([*DEFAULTS, *CANDIDATE_DEFAULTS]):  # each source's own default when not given
        value = DEFAULTS.get(name, CANDIDATE_DEFAULTS.get(name))
        where = [f"{src} {d[name]}" for src, d in (("counterfactual", DEFAULTS), ("candidates", CANDIDATE_DEFAULTS)) if name in d]
        what = {"init": "candidates: the LRM to start from: toy (the shipped counterfactual LRM), fresh (from the toy "
                        "model) or an LRM folder; ",
                "min_gap": "candidates: pairs whose softmax gap is below this are not taught; ",
                "passes": "candidates: passes over the training captions; ",
                "pairs_per_pool": "candidates: best_worst (one pair per pool) or all (every two candidates over "
                                  "--min-gap) for the training pairs; ",
                "divert_start_step": "candidates: the first step with pools (of 20); "}.get(name, "")  # fmt: skip
        lrm.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                         help=f"{what}(default: {', '.join(where)})")

    caps = sub.add_parser("captions", help="print the toy world's captions")
    caps.add_argument("--split", choices=("train", "held-out"), default="held-out",
                      help="held-out (default: combinations never trained on) or train captions")


def run(args) -> int:
    return {"pretrain": _pretrain, "export": _export, "pairs": _pairs, "lrm": _lrm,
            "captions": _captions}[args.toy_command](args)


def _pretrain(args) -> int:
    from spoxl.errors import SpoxlError
    from spoxl.toy.pretrain import DEFAULT_RECIPE, pretrain

    for name in ("images", "vae_steps", "unet_steps", "num_gpus"):
        if getattr(args, name) < 1:
            raise SpoxlError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    recipe = Path(args.config) if args.config else DEFAULT_RECIPE
    if not recipe.is_file():
        raise SpoxlError(f"recipe {recipe} does not exist")
    pretrain(Path(args.out), images=args.images, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
             ranks=args.num_gpus, seed=args.seed, recipe=recipe, extra_overrides=args.overrides)
    return 0


def _export(args) -> int:
    from spoxl.errors import SpoxlError
    from spoxl.paths import toy_model_path

    src = toy_model_path()
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpoxlError(f"{out} exists and is not an empty folder")
    if out.exists():
        out.rmdir()
    shutil.copytree(src, out)
    print(f"wrote the pretrained toy model to {out}")
    return 0


def _pairs(args) -> int:
    from spoxl.commands.eval import resolve_prompts
    from spoxl.errors import SpoxlError
    from spoxl.models.loading import load_sdxl
    from spoxl.preference_models import build_preference_model
    from spoxl.paths import check_can_create
    from spoxl.toy.pairs import counterfactual_pairs, generate_pairs, write_parquet

    if not args.out.endswith(".parquet"):
        raise SpoxlError(f"--out {args.out} must end in .parquet")
    if args.steps < 1:
        raise SpoxlError("--steps must be >= 1")
    check_can_create(Path(args.out), "--out")
    captions = resolve_prompts(args.prompts, None)
    if args.source == "counterfactual":
        from spoxl.toy import world

        scenes = [world.parse_caption(c) for c in captions]
        attributes = tuple(a.strip() for a in args.attributes.split(",") if a.strip())
        rows = counterfactual_pairs(scenes, args.n, seed=args.seed, attributes=attributes)
        path = write_parquet(rows, Path(args.out))
        print(f"wrote {len(rows)} counterfactual pairs to {path} (image 0 preferred in {sum(r['label_0'] for r in rows):.0f})")
        return 0
    scorer = build_preference_model(args.scorer)
    components = load_sdxl(args.model)
    rows = generate_pairs(components, scorer, captions, args.n, margin=args.margin, seed=args.seed,
                          steps=args.steps, cfg_scale=args.cfg, eta=args.eta)
    path = write_parquet(rows, Path(args.out))
    wins0 = sum(r["label_0"] for r in rows)
    print(f"wrote {len(rows)} pairs to {path} (image 0 preferred in {wins0:.0f})")
    return 0


def _lrm(args) -> int:
    from spoxl.errors import SpoxlError
    from spoxl.paths import check_can_create
    from spoxl.commands.toy_lrm import CANDIDATE_DEFAULTS, DEFAULTS, make_toy_lrm, make_toy_lrm_from_candidates

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpoxlError(f"{out} exists and is not an empty folder")
    check_can_create(out, "--out")
    defaults = CANDIDATE_DEFAULTS if args.source == "candidates" else DEFAULTS
    other = CANDIDATE_DEFAULTS if args.source != "candidates" else DEFAULTS
    for name in other:
        if name not in defaults and getattr(args, name) is not None:
            raise SpoxlError(f"--{name.replace('_', '-')} does not apply to --source {args.source}")
    settings = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in defaults.items()}
    for name in ("pairs", "held_out_pairs", "steps", "batch_size", "passes"):
        if name in settings and settings[name] < 1:
            raise SpoxlError(f"--{name.replace('_', '-')} must be >= 1, got {settings[name]}")
    if settings["lr"] <= 0:
        raise SpoxlError(f"--lr must be > 0, got {settings['lr']}")
    if args.source == "candidates":
        if not 0 <= settings["divert_start_step"] < 20:
            raise SpoxlError(f"--divert-start-step must be in [0, 20), got {settings['divert_start_step']}")
        if not 0 <= settings["min_gap"] < 1:
            raise SpoxlError(f"--min-gap must be in [0, 1), got {settings['min_gap']}")
        from spoxl.spo.pool_sampler import PAIRS_PER_POOL

        if settings["pairs_per_pool"] not in PAIRS_PER_POOL:  # before the model loads (the sampler checks it too)
            raise SpoxlError(f"--pairs-per-pool must be one of {', '.join(PAIRS_PER_POOL)}, got {settings['pairs_per_pool']!r}")
        record = make_toy_lrm_from_candidates(out, **settings)
    else:
        record = make_toy_lrm(out, **settings)
    after = record["held_out_accuracy_after"]
    print("held-out pairwise accuracy by t, after training: " + ", ".join(f"t={t}: {v:.2f}" for t, v in after.items()))
    print(f"wrote the toy LRM to {out} ({record['seconds']:.0f} s)")
    return 0


def _captions(args) -> int:
    from spoxl.toy import world

    scenes = world.train_scenes() if args.split == "train" else world.held_out_scenes()
    for s in scenes:
        print(s.caption())
    return 0
