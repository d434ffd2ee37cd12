"""The synthetic data: coloured shapes for tests and CPU demos, in memory or written as files.

In memory (what a recipe trains on when data.path is null):
  SyntheticCaptionDataset(n, resolution, seed)   a coloured square at a seeded position, captioned
                                                 by its colour (items as ImageCaptionDataset's)
  SyntheticPairDataset(n, resolution, seed)      pairs: the caption's colour wins over the same
                                                 square in another colour (items as PreferencePairDataset's)
As files (for the dataset readers and the CLIs):
  shape_image(colour, shape, width, height, seed) -> PIL image of one shape on a grey background
  write_caption_folder(out, n, size=(64, 64), seed=0) -> folder of NNNN.png + NNNN.txt
  write_caption_table(out_file, n, size=(64, 64), seed=0, inline_bytes=False) -> .jsonl / .parquet
      with columns image (a relative path, or PNG bytes with inline_bytes) and caption
  write_pair_table(out_file, n, size=(64, 64), seed=0, ties=0, inline_bytes=False) -> .jsonl /
      .parquet in the Pick-a-Pic layout: caption, jpg_0, jpg_1, label_0. The preferred image
      matches the caption; the other has the wrong colour. Which side wins alternates
      (label_0 = 1 or 0); the first `ties` rows are ties (label_0 = 0.5).
  write_prompt_file(out_file, n, seed=0) -> .txt / .json (SPO layout: [{"caption": ...}]) / .jsonl

Sizes need not be square: non-square sizes exercise the resize / crop / time_ids path.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import torch

from spoxl import rng
from spoxl.errors import SpoxlError

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (235, 210, 40),
}
SHAPES = ("circle", "square", "triangle")


def caption_of(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def shape_image(colour: str, shape: str, width: int = 64, height: int = 64, seed: int = 0):
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    image = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    r = rng.uniform(0.25, 0.38) * side
    cx = rng.uniform(r, width - r)
    cy = rng.uniform(r, height - r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise SpoxlError(f"unknown shape {shape!r} (choose from {', '.join(SHAPES)})")
    return image


def _combo(i: int) -> tuple[str, str]:
    colours = list(COLOURS)
    return colours[i % len(colours)], SHAPES[(i // len(colours)) % len(SHAPES)]


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_caption_folder(out, n: int, size=(64, 64), seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        colour, shape = _combo(i)
        shape_image(colour, shape, *size, seed=seed * 100_003 + i).save(out / f"{i:04d}.png")
        (out / f"{i:04d}.txt").write_text(caption_of(colour, shape) + "\n")
    return out


def _write_rows(out_file: Path, rows: list[dict]) -> Path:
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if out_file.suffix == ".jsonl":
        if any(isinstance(v, bytes) for r in rows for v in r.values()):
            raise SpoxlError("inline image bytes need .parquet (jsonl holds paths)")
        out_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif out_file.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), out_file)
    else:
        raise SpoxlError(f"{out_file} must end in .jsonl or .parquet")
    return out_file


def _image_value(image, out_file: Path, name: str, inline_bytes: bool):
    if inline_bytes:
        return _png_bytes(image)
    folder = out_file.parent / f"{out_file.stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name)
    return f"{folder.name}/{name}"  # relative to the table file


def write_caption_table(out_file, n: int, size=(64, 64), seed: int = 0, inline_bytes: bool = False) -> Path:
    out_file = Path(out_file)
    rows = []
    for i in range(n):
        colour, shape = _combo(i)
        image = shape_image(colour, shape, *size, seed=seed * 100_003 + i)
        rows.append({"image": _image_value(image, out_file, f"{i:04d}.png", inline_bytes), "caption": caption_of(colour, shape)})
    return _write_rows(out_file, rows)


def write_pair_table(out_file, n: int, size=(64, 64), seed: int = 0, ties: int = 0, inline_bytes: bool = False) -> Path:
    out_file = Path(out_file)
    colours = list(COLOURS)
    rows = []
    for i in range(n):
        colour, shape = _combo(i)
        wrong = colours[(colours.index(colour) + 1 + i % (len(colours) - 1)) % len(colours)]
        good = shape_image(colour, shape, *size, seed=seed * 100_003 + 2 * i)
        bad = shape_image(wrong, shape, *size, seed=seed * 100_003 + 2 * i + 1)
        label_0 = 0.5 if i < ties else float(i % 2 == 0)
        first, second = (good, bad) if label_0 != 0.0 else (bad, good)
        rows.append(
            {
                "caption": caption_of(colour, shape),
                "jpg_0": _image_value(first, out_file, f"{i:04d}_0.png", inline_bytes),
                "jpg_1": _image_value(second, out_file, f"{i:04d}_1.png", inline_bytes),
                "label_0": label_0,
            }
        )
    return _write_rows(out_file, rows)


def write_prompt_file(out_file, n: int, seed: int = 0) -> Path:
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    prompts = [caption_of(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(n)]
    if out_file.suffix == ".txt":
        out_file.write_text("\n".join(prompts) + "\n")
    elif out_file.suffix == ".json":
        out_file.write_text(json.dumps([{"caption": p} for p in prompts], indent=1))
    elif out_file.suffix == ".jsonl":
        out_file.write_text("".join(json.dumps({"caption": p}) + "\n" for p in prompts))
    else:
        raise SpoxlError(f"{out_file} must end in .txt, .json or .jsonl")
    return out_file


# ---------------------------------------------------------------------------------------------
# In memory

SQUARE_COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
           "white": (1.0, 1.0, 1.0), "yellow": (1.0, 1.0, -1.0), "cyan": (-1.0, 1.0, 1.0)}


def _square(colour: str, y: int, x: int, resolution: int) -> torch.Tensor:
    side = resolution // 2
    pixels = torch.full((3, resolution, resolution), -1.0)
    pixels[:, y:y + side, x:x + side] = torch.tensor(SQUARE_COLOURS[colour]).view(3, 1, 1)
    return pixels


def _position(g: torch.Generator, resolution: int) -> tuple[int, int]:
    y, x = torch.randint(0, resolution - resolution // 2 + 1, (2,), generator=g).tolist()
    return y, x


def _digest(*tensors: torch.Tensor, text: str) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.numpy().tobytes())
    h.update(text.encode())
    return h.hexdigest()[:32]


class SyntheticCaptionDataset(torch.utils.data.Dataset):
    """n images in [-1, 1]: a coloured square at a seeded position on black, captioned by colour.
    Items look like spoxl.data.captions.ImageCaptionDataset's."""

    def __init__(self, n: int, resolution: int, seed: int = 0):
        g = rng.generator(rng.SYNTHETIC_DATA, seed)
        names = list(SQUARE_COLOURS)
        self.resolution = resolution
        self.items = []
        for i in range(n):
            name = names[i % len(names)]
            self.items.append((_square(name, *_position(g, resolution), resolution), f"a {name} square"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from spoxl.models.text import make_time_ids

        pixels, caption = self.items[i]
        r = self.resolution
        return {"pixels": pixels, "caption": caption, "time_ids": make_time_ids(1, (r, r))[0], "index": i}

    def cache_key(self, i: int) -> str:
        pixels, caption = self.items[i]
        return _digest(pixels, text=caption)


class SyntheticPairDataset(torch.utils.data.Dataset):
    """n preference pairs in [-1, 1]: the winner is a square of the caption's colour, the loser the
    same square (same position, so only the colour differs) in another colour. Items look like
    spoxl.data.pairs.PreferencePairDataset's (winner first)."""

    def __init__(self, n: int, resolution: int, seed: int = 0):
        g = rng.generator(rng.SYNTHETIC_DATA, seed)
        names = list(SQUARE_COLOURS)
        self.resolution = resolution
        self.items = []
        for i in range(n):
            # The loser's colour cycles through the 5 others (offset 1..5, never 0) as i grows.
            offset = 1 + (i // len(names)) % (len(names) - 1)
            name, wrong = names[i % len(names)], names[(i + offset) % len(names)]
            y, x = _position(g, resolution)
            self.items.append((_square(name, y, x, resolution), _square(wrong, y, x, resolution), f"a {name} square"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from spoxl.models.text import make_time_ids

        pixels_w, pixels_l, caption = self.items[i]
        r = self.resolution
        return {"pixels_w": pixels_w, "pixels_l": pixels_l, "caption": caption,
                "time_ids": make_time_ids(1, (r, r))[0], "index": i}

    def cache_key(self, i: int) -> str:
        pixels_w, pixels_l, caption = self.items[i]
        return _digest(pixels_w, pixels_l, text="pair|" + caption)
