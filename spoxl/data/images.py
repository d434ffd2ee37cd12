"""Image decoding and SDXL training preprocessing (the diffusers SDXL recipe, without torchvision).

API
  open_image(source, name) -> RGB PIL image; `source` is a path, raw bytes, or a
      {"bytes": ..., "path": ...} dict (the Hugging Face `Image` feature as stored in parquet);
      a missing/corrupt file is a one-line SpoxlError naming `name`.
  source_identity(source) -> bytes that change when the image content changes (cache keys)
  Augment(resolution, crop="center"|"random", hflip=False)
      .params(width, height, generator) -> (flip, top, left): the random choices for one item
      .apply(image, flip, top, left) -> [3, R, R] float tensor in [-1, 1]
  sdxl_time_ids(original_size, crop_top_left, resolution) -> [6] float32
      (orig_h, orig_w, crop_top, crop_left, target_h, target_w), as StableDiffusionXLPipeline
  item_generator(seed, epoch, index) -> torch.Generator: per-item augmentation randomness, so the
      same (seed, epoch, index) gives the same crop/flip whatever the worker or batch order.

Order of operations (diffusers train_text_to_image_sdxl): remember the original (h, w), resize
the SHORTEST side to the resolution (bilinear), flip, crop a resolution x resolution square
(center or random), record the crop's top-left for time_ids, scale pixels to [-1, 1].
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import torch

from spoxl.errors import SpoxlError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def open_image(source, name: str | None = None):
    """Decode an image to RGB; any failure is a one-line SpoxlError naming the image."""
    from PIL import Image

    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    label = name or (str(source) if isinstance(source, (str, os.PathLike)) else "<image bytes>")
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(source)))
        elif isinstance(source, (str, os.PathLike)):
            if not Path(source).is_file():
                raise SpoxlError(f"image {label} does not exist")
            image = Image.open(source)
        else:
            raise SpoxlError(f"image {label}: expected a path or bytes, got {type(source).__name__}")
        image.load()  # decode now, so a truncated file fails here and not deep in a DataLoader
        return image.convert("RGB")
    except SpoxlError:
        raise
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise SpoxlError(f"cannot read image {label}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def source_identity(source) -> bytes:
    """What a cache key hashes for one image: the bytes themselves, or for a file its resolved
    path, size and modification time (re-hashing terabytes of files on every start is too slow)."""
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(source)).digest()
    path = Path(source).resolve()
    try:
        st = path.stat()
    except OSError:
        raise SpoxlError(f"image {source} does not exist") from None
    return f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    from spoxl import rng

    return rng.generator(rng.AUGMENT, seed, counter=(epoch, index))


def sdxl_time_ids(original_size, crop_top_left, resolution: int) -> torch.Tensor:
    h, w = original_size
    top, left = crop_top_left
    return torch.tensor([h, w, top, left, resolution, resolution], dtype=torch.float32)


def to_pixels(image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class Augment:
    """SDXL preprocessing for one resolution; random choices come from a caller's generator."""

    def __init__(self, resolution: int, crop: str = "center", hflip: bool = False):
        if crop not in ("center", "random"):
            raise SpoxlError(f"crop must be 'center' or 'random', got {crop!r}")
        if resolution < 8 or resolution % 8:
            raise SpoxlError(f"resolution must be a positive multiple of 8, got {resolution}")
        self.resolution = int(resolution)
        self.crop = crop
        self.hflip = bool(hflip)

    @property
    def is_random(self) -> bool:
        return self.crop == "random" or self.hflip

    def describe(self) -> str:
        """Stable text of the settings (part of cache keys)."""
        return f"res={self.resolution},crop={self.crop},hflip={self.hflip}"

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        scale = self.resolution / min(width, height)
        # round like torchvision's Resize(int): the short side is exactly `resolution`
        if width <= height:
            return self.resolution, max(self.resolution, int(height * scale))
        return max(self.resolution, int(width * scale)), self.resolution

    def params(self, width: int, height: int, generator: torch.Generator | None) -> tuple[bool, int, int]:
        """(flip, top, left) for an image of this original size."""
        rw, rh = self.resized_size(width, height)
        flip = False
        if self.hflip:
            flip = bool(torch.rand((), generator=generator) < 0.5)
        if self.crop == "center":
            top = int(round((rh - self.resolution) / 2.0))
            left = int(round((rw - self.resolution) / 2.0))
        else:
            top = int(torch.randint(0, rh - self.resolution + 1, (), generator=generator))
            left = int(torch.randint(0, rw - self.resolution + 1, (), generator=generator))
        return flip, top, left

    def apply(self, image, flip: bool, top: int, left: int) -> torch.Tensor:
        from PIL import Image

        image = image.resize(self.resized_size(*image.size), Image.BILINEAR)
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        return to_pixels(image)
