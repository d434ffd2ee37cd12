"""Turning prompts into images and images into PNG grids (sampling CLI, demo, TensorBoard grids)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from spoxl import rng, sampling
from spoxl.models.text import encode_with_negative, make_time_ids


def default_resolution(components) -> int:
    return components.unet.config.sample_size * sampling.vae_scale_factor(components.vae)


def initial_latents(components, n: int, seed: int, resolution: int | None = None) -> torch.Tensor:
    """Starting noise, one generator per image (seed + i): an image does not depend on batching."""
    res = resolution or default_resolution(components)
    side = res // sampling.vae_scale_factor(components.vae)
    ch = components.unet.config.in_channels
    return torch.stack(
        [torch.randn((ch, side, side), generator=rng.generator(rng.SAMPLE_LATENTS, seed, counter=i)) for i in range(n)]
    )


@torch.no_grad()
def sample_images(
    components,
    prompts: list[str],
    *,
    steps: int = 20,
    cfg_scale: float = 5.0,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    resolution: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for N prompts, batched, reproducible per (seed, index)."""
    from tqdm.auto import tqdm

    res = resolution or default_resolution(components)
    device = next(components.unet.parameters()).device
    latents = initial_latents(components, len(prompts), seed, res)
    out = []
    bar = tqdm(total=len(prompts) * steps, desc="sampling", unit="step", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        cond, uncond = encode_with_negative(components, chunk)
        time_ids = make_time_ids(len(chunk), (res, res), device=device)
        gen = rng.generator(rng.SAMPLE_STEP_NOISE, seed, counter=start)  # eta > 0 noise stream

        def tick(ts, n=len(chunk)):
            for t in ts:
                yield t
                bar.update(n)

        lat = sampling.ddim_sample(
            components,
            cond,
            uncond,
            time_ids,
            steps=steps,
            cfg_scale=cfg_scale,
            eta=eta,
            generator=gen,
            latents=latents[start : start + batch_size],
            progress=tick,
        )
        out.append(to_unit_range(sampling.decode_latents(components.vae, lat)).cpu())
    bar.close()
    return torch.cat(out)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1) / 2).clamp(0, 1)


def make_grid(images: torch.Tensor, ncols: int | None = None) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] -> one [3, rows*H, cols*W] image."""
    n, c, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = torch.ones(c, nrows * h, ncols * w)
    for i in range(n):
        r, col = divmod(i, ncols)
        grid[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = images[i]
    return grid


def save_grid(images: torch.Tensor, path, ncols: int | None = None) -> Path:
    from PIL import Image

    grid = make_grid(images, ncols)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    from spoxl.errors import SpoxlError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        Image.fromarray(arr).save(tmp)
        tmp.replace(path)
    except OSError as e:  # a parent that is a file, a name the filesystem refuses, a full disk
        raise SpoxlError(f"cannot write {path}: {e.strerror or e}") from None
    return path
