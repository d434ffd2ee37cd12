"""Pretraining data for the toy world: jittered renderings of the training scenes.

  render_set(n, seed) -> (uint8 [n, 3, R, R] tensor, captions): scene i is train_scenes()[j] for a
      seeded shuffle, each drawn with its own seeded jitter; a fraction of captions is "" so the
      model learns the unconditional prediction that classifier-free guidance subtracts.
  write_caption_folder(dir, images, captions): PNG + same-stem .txt, the layout
      spoxl.data.captions.ImageCaptionDataset reads (what the SFT engine trains on).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from spoxl.toy import world

# CFG needs an unconditional model: this share of pretraining captions is empty (SD used 10%).
EMPTY_CAPTION_RATE = 0.1


def render_set(n: int, seed: int = 0, resolution: int = world.RESOLUTION,
               empty_caption_rate: float = EMPTY_CAPTION_RATE) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(seed)
    scenes = world.train_scenes()
    images, captions = [], []
    for i in range(n):
        if i % len(scenes) == 0:
            rng.shuffle(scenes)  # every scene once per len(scenes) items, in a seeded order
        scene = scenes[i % len(scenes)]
        image = world.render(scene, resolution, *world.jittered(rng))
        images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        captions.append("" if rng.random() < empty_caption_rate else scene.caption())
    return torch.stack(images), captions


def write_caption_folder(folder: Path, images: torch.Tensor, captions: list[str]) -> Path:
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (img, cap) in enumerate(zip(images, captions)):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(cap + "\n", encoding="utf-8")
    return folder


def to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> float [-1, 1] (the VAE's pixel range)."""
    return images_uint8.float() / 127.5 - 1.0
