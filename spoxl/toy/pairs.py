"""Offline preference sets for the toy world.

`generate_pairs`: drawn from a model's own samples, labelled by a toy scorer.

As MaPO's Pick-Style / Pick-Safety sets were generated from SDXL's samples: for each pair, one
training caption and two seeds; both images are sampled by the model and scored; the higher score
wins. Pairs whose scores differ by less than `margin` (scaled units, spoxl.toy.scorers) are ties
and are dropped; sampling continues until `n` pairs are kept (or `max_rounds` batches are spent).
Which image is jpg_0 is a coin flip per pair, so the label column is not constant.

`counterfactual_pairs`: no model at all. The winner is the caption's scene rendered exactly, the
loser the same rendering (same jitter) with ONE attribute changed (colour, shape, position, size or
background). The label is known exactly and the two images differ only where the caption is
violated, so the pairs isolate whether a method learns the caption-to-picture preference, and one
built on held-out captions measures whether what it learned generalises.

Output (both): a parquet file in the Pick-a-Pic v2 layout spoxl.data.pairs reads: caption, jpg_0, jpg_1
(PNG bytes), label_0, label_1 (1/0), are_different, has_label, plus score_0, score_1 (the scorer's
values) for inspection.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import torch

from spoxl.errors import SpoxlError


def _png(image01: torch.Tensor) -> bytes:
    from PIL import Image

    arr = (image01.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@torch.no_grad()
def generate_pairs(components, scorer, captions: list[str], n: int, *, margin: float = 1.0, seed: int = 0,
                   steps: int = 20, cfg_scale: float = 5.0, eta: float = 0.0, batch_pairs: int = 32,
                   max_rounds: int | None = None, progress: bool = True) -> list[dict]:
    """Up to n labelled pairs (dicts of the parquet's columns)."""
    from tqdm.auto import tqdm

    from spoxl.imaging import sample_images

    if n < 1:
        raise SpoxlError(f"--n must be >= 1, got {n}")
    if margin < 0:
        raise SpoxlError(f"--margin must be >= 0, got {margin}")
    if hasattr(scorer, "check_prompts"):
        scorer.check_prompts(captions)
    rng = random.Random(seed)
    max_rounds = max_rounds or 4 * (n // batch_pairs + 1)
    rows: list[dict] = []
    bar = tqdm(total=n, desc="pairs", unit="pair", disable=not progress)
    for round_ in range(max_rounds):
        chunk = [rng.choice(captions) for _ in range(batch_pairs)]
        doubled = [c for c in chunk for _ in range(2)]  # image 2j and 2j + 1 share caption j
        # One seed range per round: image i is drawn from seed base + i (spoxl.imaging).
        images = sample_images(components, doubled, steps=steps, cfg_scale=cfg_scale, eta=eta,
                               seed=seed * 1_000_003 + round_ * 2 * batch_pairs, batch_size=len(doubled))  # fmt: skip
        scores = scorer.score(images * 2 - 1, doubled, 0).float().cpu().view(-1, 2)
        for j, caption in enumerate(chunk):
            s0, s1 = float(scores[j, 0]), float(scores[j, 1])
            if s0 == s1 or abs(s0 - s1) < margin:  # a tie (also at margin 0)
                continue
            a, b = (2 * j, 2 * j + 1) if rng.random() < 0.5 else (2 * j + 1, 2 * j)
            sa, sb = float(scores.flatten()[a]), float(scores.flatten()[b])
            label_0 = 1.0 if sa > sb else 0.0
            rows.append({"caption": caption, "jpg_0": _png(images[a]), "jpg_1": _png(images[b]),
                         "label_0": label_0, "label_1": 1.0 - label_0, "are_different": True, "has_label": True,
                         "score_0": sa, "score_1": sb})  # fmt: skip
            bar.update(1)
            if len(rows) == n:
                bar.close()
                return rows
    bar.close()
    if not rows:
        raise SpoxlError(f"no pair cleared the margin {margin} in {max_rounds} rounds; lower --margin")
    print(f"warning: kept {len(rows)} of {n} pairs after {max_rounds} rounds (margin {margin})", flush=True)
    return rows


def counterfactual_pairs(scenes: list, n: int, *, seed: int = 0,
                         attributes: tuple[str, ...] = ("colour", "shape", "position", "size", "background"),
                         resolution: int = 64) -> list[dict]:
    """n pairs (rows of the parquet's columns): a scene's exact rendering against the same rendering
    with one attribute (drawn from `attributes`) set to another value. Deterministic in `seed`."""
    import dataclasses

    from spoxl.toy import world

    if n < 1:
        raise SpoxlError(f"--n must be >= 1, got {n}")
    if not scenes:
        raise SpoxlError("counterfactual pairs need at least one scene")
    options = {"colour": tuple(world.COLOURS), "shape": world.SHAPES, "position": tuple(world.POSITIONS),
               "size": tuple(world.SIZES), "background": tuple(world.BACKGROUNDS)}
    unknown = [a for a in attributes if a not in options]
    if unknown or not attributes:
        raise SpoxlError(f"unknown toy attribute(s) {unknown or attributes} (known: {', '.join(options)})")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        scene = rng.choice(scenes)
        attribute = rng.choice(attributes)
        wrong = rng.choice([v for v in options[attribute] if v != getattr(scene, attribute)])
        loser_scene = dataclasses.replace(scene, **{attribute: wrong})
        dx, dy, scale = world.jittered(rng)
        images = [world.render(s, resolution, dx, dy, scale) for s in (scene, loser_scene)]
        winner_first = rng.random() < 0.5  # which side is jpg_0 is a coin flip, as in generate_pairs
        a, b = (0, 1) if winner_first else (1, 0)
        rows.append({"caption": scene.caption(), "jpg_0": _pil_png(images[a]), "jpg_1": _pil_png(images[b]),
                     "label_0": 1.0 if winner_first else 0.0, "label_1": 0.0 if winner_first else 1.0,
                     "are_different": True, "has_label": True, "changed": attribute})  # fmt: skip
    return rows


def pair_items(rows: list[dict]) -> list[dict]:
    """Rows as preference items, winner first (the keys spoxl.evaluation.preference_accuracy
    reads), decoded here and NOT through spoxl.data.pairs.PreferencePairDataset: a probe that
    must stay right when that data path is wrong (a side swap there flips training pairs, and
    would flip a probe read through it too, so that the two cancel)."""
    from PIL import Image

    from spoxl.data.images import sdxl_time_ids, to_pixels

    items = []
    for r in rows:
        images = [to_pixels(Image.open(io.BytesIO(r[k])).convert("RGB")) for k in ("jpg_0", "jpg_1")]
        winner, loser = images if r["label_0"] == 1.0 else images[::-1]
        size = winner.shape[-1]
        items.append({"pixels_w": winner, "pixels_l": loser, "caption": r["caption"],
                      "time_ids": sdxl_time_ids((size, size), (0, 0), size)})
    return items


def _pil_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(rows: list[dict], out: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(out)  # never a half-written file under the final name
    return out
