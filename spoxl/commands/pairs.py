"""`spoxl pairs`: tools for preference-pair sets.

    spoxl pairs absolute-winners --data SRC --out OUT.parquet   NCP's "absolute winners" subset
"""

from __future__ import annotations


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="pairs_command", metavar="SUBCOMMAND", required=True)
    aw = sub.add_parser("absolute-winners",
                        help="NCP's subset: per prompt, images that won and never lost or tied, one pair each")
    aw.add_argument("--data", required=True, help="a Pick-a-Pic .parquet file, a folder of shards or a glob")
    aw.add_argument("--out", required=True, help="the .parquet file to write")
    aw.add_argument("--caption-column", default="caption", help="default caption")
    aw.add_argument("--image-0-column", default="jpg_0", help="default jpg_0")
    aw.add_argument("--image-1-column", default="jpg_1", help="default jpg_1")
    aw.add_argument("--label-column", default="label_0", help="P(image 0 preferred): 1, 0 or 0.5 (default label_0)")
    aw.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from pathlib import Path

    from spoxl.data.absolute_winners import filter_absolute_winners
    from spoxl.paths import check_can_create

    check_can_create(Path(args.out), "--out")
    kept, total = filter_absolute_winners(
        args.data, args.out, caption_column=args.caption_column, image_0_column=args.image_0_column,
        image_1_column=args.image_1_column, label_column=args.label_column, progress=not args.no_progress)
    print(f"kept {kept} of {total} pairs ({100 * kept / max(total, 1):.1f}%) in {args.out}")
    return 0
