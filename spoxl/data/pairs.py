"""Preference-pair datasets (Pick-a-Pic layout) for Diffusion-DPO, MaPO and NCP.

API
  PreferencePairDataset(path, resolution, crop="center", hflip=False, seed=0, drop_ties=True,
                        image_0_column="jpg_0", image_1_column="jpg_1",
                        label_column="label_0", caption_column="caption", joint_flip=True)
  dataset[i] -> {"pixels_w": [3, R, R], "pixels_l": [3, R, R] (in [-1, 1]), "caption": str,
                 "time_ids": [6] float32, "original_size", "crop_top_left", "tie": bool, "index": i}
  dataset.set_epoch(e); dataset.cache_key(i) -> str; len(dataset) counts kept rows only

`path` is a .jsonl or .parquet file, a folder of .parquet shards or a glob of them (Pick-a-Pic v2 as
published; read by row group on demand, spoxl.data.tables); jpg_0/jpg_1 hold paths (relative to
the file) or bytes. Rows whose `are_different` or `has_label` column (when present) is false are
dropped, as Pick-a-Pic's own loaders do.
label_0 is the probability that image 0 is preferred: 1 -> image 0 wins, 0 -> image 1 wins,
anything else (0.5) is a tie. Ties are dropped by default (Diffusion-DPO, MaPO); with
drop_ties=False a tie keeps image 0 as "w" and sets tie=True.

Preprocessing follows diffusers' Diffusion-DPO SDXL script: image 1 is first resized to image
0's size; original_size = image 0's; the pair gets ONE resize, ONE flip decision and ONE crop
(jointly), so w and l stay pixel-aligned and share time_ids. joint_flip=False flips each image
on its own (MaPO's official loader); the crop stays shared.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch.utils.data import Dataset

from spoxl.data.images import Augment, item_generator, open_image, sdxl_time_ids, source_identity
from spoxl.data.tables import Table, resolve_image
from spoxl.errors import SpoxlError


FLAG_COLUMNS = ("are_different", "has_label")


def _label(value, path: Path, row: int) -> float:
    try:
        label = float(value)
    except (TypeError, ValueError):
        raise SpoxlError(f"dataset {path} row {row}: label {value!r} is not a number") from None
    if math.isnan(label) or not 0.0 <= label <= 1.0:
        raise SpoxlError(f"dataset {path} row {row}: label {value!r} is not in [0, 1]")
    return label


class PreferencePairDataset(Dataset):
    def __init__(
        self,
        path,
        resolution: int,
        crop: str = "center",
        hflip: bool = False,
        seed: int = 0,
        drop_ties: bool = True,
        image_0_column: str = "jpg_0",
        image_1_column: str = "jpg_1",
        label_column: str = "label_0",
        caption_column: str = "caption",
        joint_flip: bool = True,
    ):
        self.path = Path(path).expanduser()
        self.augment = Augment(resolution, crop, hflip)
        self.seed = int(seed)
        self.epoch = 0
        self.joint_flip = bool(joint_flip)
        self.columns = (image_0_column, image_1_column, label_column, caption_column)
        if self.path.is_dir() and not any(self.path.glob("*.parquet")):
            raise SpoxlError(f"preference dataset {self.path} is a folder without .parquet shards")
        self.table = Table.open(str(path), list(self.columns), optional=FLAG_COLUMNS)
        labels = [_label(v, self.path, i) for i, v in enumerate(self.table.column(label_column))]
        self._labels = labels
        usable = [True] * len(labels)
        for flag in FLAG_COLUMNS:  # Pick-a-Pic: are_different=False (identical images), has_label=False
            if flag in self.table.columns:
                usable = [u and v is not False for u, v in zip(usable, self.table.column(flag))]
        self._rows = [i for i, lab in enumerate(labels) if usable[i] and not (drop_ties and lab not in (0.0, 1.0))]
        if not self._rows:
            raise SpoxlError(f"dataset {self.path} has no usable pairs ({len(labels)} rows: ties, unlabelled or identical)")

    def __len__(self) -> int:
        return len(self._rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def captions(self) -> list[str]:
        """Every item's caption, in item order, without reading any image."""
        column = self.table.column(self.columns[3])
        return [column[row] if column[row] is not None else "" for row in self._rows]

    def _sources(self, row: int) -> tuple:
        c0, c1, _, cap = self.columns
        r = self.table.row(row)
        caption = r[cap] if r[cap] is not None else ""
        if not isinstance(caption, str):
            raise SpoxlError(f"dataset {self.path} row {row}: caption must be text")
        return resolve_image(r[c0], self.table.base_dir), resolve_image(r[c1], self.table.base_dir), caption

    def cache_key(self, i: int) -> str:
        row = self._rows[i]
        s0, s1, caption = self._sources(row)
        h = hashlib.sha256(source_identity(s0))
        h.update(source_identity(s1))
        h.update(f"|{caption}|label={self._labels[row]}|{self.augment.describe()}".encode())
        if self.augment.is_random:
            h.update(f"seed={self.seed},epoch={self.epoch},index={i},joint={self.joint_flip}".encode())
        return h.hexdigest()[:32]

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        row = self._rows[i]
        s0, s1, caption = self._sources(row)
        name = lambda s, k: s if isinstance(s, str) else f"{self.path} row {row} {self.columns[k]}"  # noqa: E731
        im0, im1 = open_image(s0, name(s0, 0)), open_image(s1, name(s1, 1))
        if im1.size != im0.size:
            im1 = im1.resize(im0.size, Image.BILINEAR)
        w, h = im0.size
        gen = item_generator(self.seed, self.epoch, i)
        flip, top, left = self.augment.params(w, h, gen)
        # MaPO's official loader flips each image on its own; diffusers (default) flips the pair.
        flip1 = flip if self.joint_flip or not self.augment.hflip else bool(torch.rand((), generator=gen) < 0.5)
        px0 = self.augment.apply(im0, flip, top, left)
        px1 = self.augment.apply(im1, flip1, top, left)
        label = self._labels[row]
        # label_0 == 0 means image 1 is preferred: put the winner first.
        pixels_w, pixels_l = (px1, px0) if label == 0.0 else (px0, px1)
        return {
            "pixels_w": pixels_w,
            "pixels_l": pixels_l,
            "caption": caption,
            "time_ids": sdxl_time_ids((h, w), (top, left), self.augment.resolution),
            "original_size": torch.tensor([h, w]),
            "crop_top_left": torch.tensor([top, left]),
            "tie": label not in (0.0, 1.0),
            "index": i,
        }
