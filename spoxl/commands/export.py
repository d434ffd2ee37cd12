"""`spoxl export`: turn a saved DeepSpeed checkpoint into files diffusers / ComfyUI / A1111 load.

    spoxl export --checkpoint RUN_DIR_OR_CKPT --out DIR [--format diffusers|kohya|unet ...]

RUN_DIR_OR_CKPT is a run's output dir (with checkpoints/ and config.yaml), its checkpoints dir,
or one step_XXXXXXXX tag folder. Formats default to the run's export.formats (LoRA runs:
diffusers + kohya; full fine-tuning: unet). An EMA saved in the checkpoint is exported to DIR/ema.
Training itself exports at the end (export.at_end); this command is for any checkpoint later.
"""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or a step_* tag folder")
    p.add_argument("--out", required=True, help="folder to write the exported weights to")
    p.add_argument("--format", dest="formats", action="append", choices=["diffusers", "kohya", "unet"],
                   help="diffusers (LoRA safetensors), kohya (LoRA in sd-scripts' SDXL names) or unet (merged/full "
                        "diffusers UNet folder); repeatable")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    p.add_argument("--config", default=None, help="the run's YAML (default: config.yaml beside the checkpoints)")
    p.add_argument("--model", default=None, help="base model path, if it moved since training")
    p.add_argument("--lora-dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="dtype of the LoRA files (default: the run's export.lora_dtype, fp32)")
    p.add_argument("--no-ema", action="store_true", help="skip the EMA weights even if the checkpoint has them")


def run(args) -> int:
    from spoxl.engine.export import export_checkpoint

    paths = export_checkpoint(args.checkpoint, args.out, formats=args.formats, config_path=args.config,
                              tag=args.tag, model=args.model, with_ema=not args.no_ema,
                              lora_dtype=args.lora_dtype)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0
