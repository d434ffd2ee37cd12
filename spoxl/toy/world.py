"""The toy world: captions from a small grammar, rendered exactly with PIL.

A caption names five attributes of ONE flat-coloured shape on a plain background:

    "a small red circle at the top left on a black background"
     size  colour shape  position             background

  colour      red, green, blue, yellow, magenta, cyan      (6)
  shape       circle, square, triangle                      (3)
  position    top left, top right, bottom left, bottom right, center   (5)
  size        small (16 px), large (28 px) at 64 px         (2)
  background  black, white                                  (2)

`render(scene)` draws the scene exactly (4x supersampled, box-filtered down, so edges are
anti-aliased the same way every time); `jitter` moves the centre by up to a few pixels and scales
the size a little, so pretraining sees a distribution rather than 360 fixed pictures.

The split is by COMBINATION: 18 of the 90 (colour, shape, position) triples never appear in
pretraining (`HELD_OUT_TRIPLES`, every colour, shape and position still appears on its own and in
every pair), so evaluation on held-out captions measures generalisation, not memory.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import dataclass

from spoxl.errors import SpoxlError

RESOLUTION = 64

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "white": (255, 255, 255)}
SHAPES = ("circle", "square", "triangle")
# Object centre as a fraction of the image side (x, y).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
# Side of the object's bounding square as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.25, "large": 0.4375}


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    position: str
    size: str
    background: str

    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where} on a {self.background} background"

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.position)


def all_scenes() -> list[Scene]:
    return [Scene(c, s, p, z, b) for c, s, p, z, b in
            itertools.product(COLOURS, SHAPES, POSITIONS, SIZES, BACKGROUNDS)]


def _held_out_triples(fraction: float = 0.2) -> frozenset:
    """A fixed 20% of (colour, shape, position) triples, chosen by a stable hash, with every pair
    of attributes still present in the training triples (checked: a held-out triple is composed
    from parts that were all seen)."""
    triples = sorted(itertools.product(COLOURS, SHAPES, POSITIONS))
    ranked = sorted(triples, key=lambda t: hashlib.sha256("|".join(t).encode()).hexdigest())
    held = set(ranked[: round(fraction * len(triples))])
    train = [t for t in triples if t not in held]
    for i, j in ((0, 1), (0, 2), (1, 2)):
        seen = {(t[i], t[j]) for t in train}
        for t in held:
            assert (t[i], t[j]) in seen, f"held-out triple {t} has an attribute pair never seen in training"
    return frozenset(held)


HELD_OUT_TRIPLES = _held_out_triples()
# Every word a caption can hold (the toy tokenizers make each one token: spoxl.toy.model).
VOCABULARY = tuple(sorted({w for s in all_scenes() for w in s.caption().split()}))


def train_scenes() -> list[Scene]:
    return [s for s in all_scenes() if s.triple not in HELD_OUT_TRIPLES]


def held_out_scenes() -> list[Scene]:
    return [s for s in all_scenes() if s.triple in HELD_OUT_TRIPLES]


def held_out_captions(n: int | None = None, seed: int = 0) -> list[str]:
    """Held-out captions; `n` picks a fixed, seeded subset (all when None)."""
    captions = [s.caption() for s in held_out_scenes()]
    if n is not None:
        captions = random.Random(seed).sample(captions, min(n, len(captions)))
    return captions


def parse_caption(caption: str) -> Scene:
    """The scene a caption describes, or a one-line error naming what is missing."""
    text = " ".join(caption.lower().replace(",", " ").replace(".", " ").split())
    words = text.split()

    def one(kind: str, options) -> str:
        found = [o for o in options if o in words]
        if len(found) != 1:
            raise SpoxlError(f"toy caption {caption!r} must name exactly one {kind} "
                             f"({', '.join(options)}), found {found or 'none'}")
        return found[0]

    backgrounds = [b for b in BACKGROUNDS if f"{b} background" in text]
    if len(backgrounds) != 1:
        raise SpoxlError(f"toy caption {caption!r} must name exactly one background "
                         f"({' / '.join(f'{b} background' for b in BACKGROUNDS)}), found {backgrounds or 'none'}")
    background = backgrounds[0]
    # The background's colour word is not the object's colour: drop "<bg> background" first.
    object_words = text.replace(f"{background} background", "").split()
    colours = [c for c in COLOURS if c in object_words]
    if len(colours) != 1:
        raise SpoxlError(f"toy caption {caption!r} must name exactly one object colour "
                         f"({', '.join(COLOURS)}), found {colours or 'none'}")
    positions = [p for p in POSITIONS if p in text]
    if len(positions) != 1:
        raise SpoxlError(f"toy caption {caption!r} must name exactly one position "
                         f"({', '.join(POSITIONS)}), found {positions or 'none'}")
    position = positions[0]
    return Scene(colours[0], one("shape", SHAPES), position, one("size", SIZES), background)


@dataclass(frozen=True)
class Placement:
    """Where the object lands in pixels: centre (cx, cy) and bounding-square side."""

    cx: float
    cy: float
    side: float


def placement(scene: Scene, resolution: int = RESOLUTION, dx: float = 0.0, dy: float = 0.0,
              scale: float = 1.0) -> Placement:
    fx, fy = POSITIONS[scene.position]
    return Placement(fx * resolution + dx, fy * resolution + dy, SIZES[scene.size] * resolution * scale)


def shape_polygon(shape: str, p: Placement, ss: int = 1):
    """The shape's outline in (supersampled) pixel coordinates: a box for circle/square (PIL
    ellipse/rectangle), the vertex list for the upward triangle."""
    h = p.side / 2
    x0, y0, x1, y1 = (p.cx - h) * ss, (p.cy - h) * ss, (p.cx + h) * ss, (p.cy + h) * ss
    if shape == "triangle":
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    return [x0, y0, x1, y1]


def render_mask(shape: str, p: Placement, resolution: int = RESOLUTION, supersample: int = 4):
    """The shape's coverage in [0, 1] per pixel (float32 numpy [R, R]), anti-aliased."""
    import numpy as np
    from PIL import Image, ImageDraw

    big = Image.new("L", (resolution * supersample,) * 2, 0)
    draw = ImageDraw.Draw(big)
    outline = shape_polygon(shape, p, supersample)
    if shape == "circle":
        draw.ellipse(outline, fill=255)
    elif shape == "square":
        draw.rectangle(outline, fill=255)
    elif shape == "triangle":
        draw.polygon(outline, fill=255)
    else:
        raise SpoxlError(f"unknown toy shape {shape!r} (known: {', '.join(SHAPES)})")
    small = big.resize((resolution, resolution), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render(scene: Scene, resolution: int = RESOLUTION, dx: float = 0.0, dy: float = 0.0, scale: float = 1.0):
    """The scene as an RGB PIL image (exact: the same scene and offsets give the same pixels)."""
    import numpy as np
    from PIL import Image

    cover = render_mask(scene.shape, placement(scene, resolution, dx, dy, scale), resolution)[..., None]
    fg = np.array(COLOURS[scene.colour], dtype=np.float32)
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    pixels = cover * fg + (1 - cover) * bg
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


def jittered(rng: random.Random, max_shift: float = 3.0, max_scale: float = 0.12) -> tuple[float, float, float]:
    """(dx, dy, scale) of one pretraining rendering."""
    return (rng.uniform(-max_shift, max_shift), rng.uniform(-max_shift, max_shift),
            1.0 + rng.uniform(-max_scale, max_scale))
