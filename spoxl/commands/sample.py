"""`spoxl sample`: batched SDXL DDIM sampling with CFG, written as a PNG grid."""

from __future__ import annotations



def add_arguments(p) -> None:
    p.add_argument("--model", default="tiny", help='"tiny", "toy" (the pretrained toy-world model) or a local diffusers SDXL folder (default tiny)')
    p.add_argument("--variant", default=None, help='weight files to load, e.g. "fp16" for *.fp16.safetensors '
                   '(default: the plain weights, or the only variant a folder has)')
    p.add_argument("--unet-file", default=None, help="single-file UNet .safetensors replacing the folder's UNet")
    p.add_argument("--vae-file", default=None, help="single-file VAE .safetensors replacing the folder's VAE")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts", default=None, help="prompt file: .txt (one per line), .json or .jsonl")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 deterministic, 1 = DDPM-like)")
    p.add_argument("--seed", type=int, default=0, help="image i is drawn from seed + i (default 0)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (grid columns; default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="images per UNet batch")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: the model's)")
    p.add_argument("--lora", default=None, help="LoRA .safetensors (diffusers or kohya keys)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--out", default="grid.png", help="output PNG path")


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """--prompt values, then the prompts of --prompts FILE (.txt lines, or SPO-style .json/.jsonl)."""
    from spoxl.data.prompts import load_prompts
    from spoxl.errors import SpoxlError

    out = list(prompts)
    if prompts_file:
        out += load_prompts(prompts_file)
    if not out:
        raise SpoxlError("no prompts: pass --prompt TEXT or --prompts FILE")
    return out


def run(args) -> int:
    import torch

    from spoxl.errors import SpoxlError
    from spoxl.imaging import sample_images, save_grid
    from spoxl.models.loading import load_sdxl
    from spoxl.models.lora import load_lora_into_unet

    if args.steps < 1:
        raise SpoxlError("--steps must be >= 1")
    if not args.out.lower().endswith(".png"):
        raise SpoxlError(f"--out {args.out} must end in .png")
    from spoxl.paths import check_can_create

    check_can_create(args.out, "--out")
    prompts = read_prompts(args.prompt, args.prompts)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    components = load_sdxl(args.model, unet_file=args.unet_file, vae_file=args.vae_file, dtype=dtype,
                           variant=args.variant)
    if args.lora:
        load_lora_into_unet(components.unet, args.lora)
    components.to(device)
    all_prompts = [p for p in prompts for _ in range(args.images_per_prompt)]
    images = sample_images(
        components,
        all_prompts,
        steps=args.steps,
        cfg_scale=args.cfg,
        eta=args.eta,
        seed=args.seed,
        batch_size=args.batch_size,
        resolution=args.resolution,
        progress=True,
    )
    save_grid(images, args.out, ncols=args.images_per_prompt if args.images_per_prompt > 1 else None)
    print(f"wrote {len(images)} images to {args.out}")
    return 0
