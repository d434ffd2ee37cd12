"""Image-caption datasets for supervised fine-tuning (SFT).

API
  ImageCaptionDataset(path, resolution, crop="center", hflip=False, seed=0,
                      image_column=None, caption_column=None)
  dataset[i] -> {"pixels": [3, R, R] in [-1, 1], "caption": str, "time_ids": [6] float32,
                 "original_size": (h, w) long, "crop_top_left": (top, left) long, "index": i}
  dataset.set_epoch(e)      new crop/flip draws per epoch (random crop / hflip only)
  dataset.cache_key(i) -> str   content hash of the item's source + preprocessing (spoxl.data.cache)
  dataset.captions() -> list[str]

`path` is one of
  * a folder of images (.png .jpg .jpeg .webp .bmp, searched recursively) each with a same-stem
    .txt caption beside it (a missing .txt is an error naming the image);
  * a .jsonl or .parquet file with an image column (a path relative to the file, or bytes, or
    a {"bytes", "path"} struct) and a caption column. Columns default to the first present of
    image / image_path / file_name / jpg and caption / text / prompt.
The default torch collate batches these dicts (captions become a list of str).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

from spoxl.data.images import IMAGE_SUFFIXES, Augment, item_generator, open_image, sdxl_time_ids, source_identity
from spoxl.data.tables import Table, resolve_image
from spoxl.errors import SpoxlError

IMAGE_COLUMNS = ("image", "image_path", "file_name", "jpg")
CAPTION_COLUMNS = ("caption", "text", "prompt")


def _pick_column(path: Path, given: str | None, candidates: tuple[str, ...]) -> str:
    if given:
        return given
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            names = set(pq.read_schema(path).names)
        except Exception as e:
            raise SpoxlError(f"cannot read parquet {path}: {str(e).splitlines()[0]}") from None
    else:
        names = set()
        with open(path, encoding="utf-8") as f:
            import json

            for line in f:
                if line.strip():
                    try:
                        names = set(json.loads(line))
                    except (ValueError, TypeError):
                        names = set()  # Table.open reports the bad line
                    break
    for c in candidates:
        if c in names:
            return c
    return candidates[0]  # Table.open then reports it missing, listing the real columns


class ImageCaptionDataset(Dataset):
    def __init__(
        self,
        path,
        resolution: int,
        crop: str = "center",
        hflip: bool = False,
        seed: int = 0,
        image_column: str | None = None,
        caption_column: str | None = None,
    ):
        self.path = Path(path).expanduser()
        self.augment = Augment(resolution, crop, hflip)
        self.seed = int(seed)
        self.epoch = 0
        if not self.path.exists():
            raise SpoxlError(f"dataset {self.path} does not exist")
        if self.path.is_dir():
            self._sources, self._captions = _scan_folder(self.path)
        else:
            image_col = _pick_column(self.path, image_column, IMAGE_COLUMNS)
            caption_col = _pick_column(self.path, caption_column, CAPTION_COLUMNS)
            self._table = Table.open(self.path, [image_col, caption_col])
            self._image_col = image_col
            # Images stay in the table until asked for (a parquet may hold every image's bytes).
            self._sources = None
            self._captions = [_caption(v, self.path, i) for i, v in enumerate(self._table.column(caption_col))]

    def __len__(self) -> int:
        return len(self._captions)

    def _source(self, i: int):
        if self._sources is not None:
            return self._sources[i]
        return resolve_image(self._table.row(i)[self._image_col], self._table.base_dir)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def captions(self) -> list[str]:
        return list(self._captions)

    def _name(self, i: int, src) -> str:
        return src if isinstance(src, str) else f"{self.path} row {i}"

    def cache_key(self, i: int) -> str:
        h = hashlib.sha256(source_identity(self._source(i)))
        h.update(self._captions[i].encode())
        h.update(self.augment.describe().encode())
        if self.augment.is_random:  # the crop/flip drawn for this item is part of its content
            h.update(f"seed={self.seed},epoch={self.epoch},index={i}".encode())
        return h.hexdigest()[:32]

    def __getitem__(self, i: int) -> dict:
        src = self._source(i)
        image = open_image(src, self._name(i, src))
        w, h = image.size
        gen = item_generator(self.seed, self.epoch, i)
        flip, top, left = self.augment.params(w, h, gen)
        return {
            "pixels": self.augment.apply(image, flip, top, left),
            "caption": self._captions[i],
            "time_ids": sdxl_time_ids((h, w), (top, left), self.augment.resolution),
            "original_size": torch.tensor([h, w]),
            "crop_top_left": torch.tensor([top, left]),
            "index": i,
        }


def _caption(value, path: Path, i: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SpoxlError(f"dataset {path} row {i}: caption must be text, got {type(value).__name__}")
    return value


def _scan_folder(folder: Path) -> tuple[list[str], list[str]]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise SpoxlError(f"dataset folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    captions = []
    for p in images:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            raise SpoxlError(f"image {p} has no caption file {txt.name}")
        captions.append(txt.read_text(encoding="utf-8").strip())
    return [str(p) for p in images], captions
