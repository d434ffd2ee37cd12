"""`spoxl make-tiny DIR`: save the tiny random SDXL (or SD1.5) as a diffusers folder (loads like a real one)."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("out", help="folder to write (created; must be empty or absent)")
    p.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    p.add_argument("--arch", choices=("sdxl", "sd15"), default="sdxl",
                   help="sdxl (two text encoders, text_time conditioning; default) or sd15 (one text encoder)")


def run(args) -> int:
    from spoxl.errors import SpoxlError
    from spoxl.models.tiny import build_tiny_sd15, build_tiny_sdxl

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SpoxlError(f"{out} exists and is not an empty folder")
    (build_tiny_sd15 if args.arch == "sd15" else build_tiny_sdxl)(args.seed).save_pretrained(out)
    print(f"wrote tiny {'SD1.5' if args.arch == 'sd15' else 'SDXL'} (seed {args.seed}) to {out}")
    return 0
