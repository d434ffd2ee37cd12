"""Exact scorers of the toy world, measured from pixels.

Every scorer reads images in [-1, 1] ([N, 3, H, W], any H = W) and the captions they were drawn
for, and follows the convention of spoxl.models.scorers: score = scale * similarity, similarity in
[-1, 1], default scale 100 (so SPO's threshold tau keeps a pair when the similarities differ by
more than 2 * atanh(tau) / scale, as with PickScore-scaled models). They are step-aware the way the
programmatic scorers are: the pool sampler hands them a candidate's decoded predicted x0 at its own
timestep; a noisy step's prediction is blurrier, and scores lower and less sharply.

What is measured, with the caption parsed by spoxl.toy.world.parse_caption:

  foreground  w = clamp((||rgb - background|| - 0.15) / 0.35, 0, 1) per pixel: how far a pixel is
              from the background the caption names (soft, so blurry predictions give partial
              credit; the dead zone keeps faint noise over the whole background from adding up).
  colour      1 - 2 * (the w-weighted mean distance of foreground pixels to the named colour,
              / sqrt(3)); one pseudo-pixel at the largest distance, so an empty image scores -1.
  position    1 - 2 * min(1, distance of the foreground centroid to the named position's centre
              / half the image side).
  size        1 - 2 * min(1, |log(foreground area / named size's area)| / log 4).
  shape       2 * IoU - 1 of the soft foreground mask and the named shape drawn at the measured
              centroid with the measured area (so shape is judged apart from position and size).
  background  1 - 2 * (mean distance of the outermost pixel ring to the named background / sqrt(3)).
  fidelity    the mean of the five: the combined prompt-fidelity score.
  aesthetic   1 - 2 * min(1, mean distance of each pixel to the nearest colour of the world's
              palette / 0.25): clean flat colours and edges score high, noise and smears low.
              It ignores the caption.

`ToyScorer.attributes` returns all of these at once, and `ToyScorer.correct` the per-attribute
right/wrong calls eval reports as accuracies (the nearest colour, shape, position, size).
"""

from __future__ import annotations

import math

import torch

from spoxl.models.preference_io import as_timesteps, check_inputs
from spoxl.toy import world

DEFAULT_SCALE = 100.0
FOREGROUND_DISTANCE = 0.5  # a pixel this far (RGB in [0, 1]) from the background counts fully
FOREGROUND_DEADZONE = 0.15  # ... and one closer than this not at all (sampling noise, faint smears)
AESTHETIC_DISTANCE = 0.25
ATTRIBUTES = ("colour", "shape", "position", "size", "background")
SCORES = (*ATTRIBUTES, "fidelity", "aesthetic")

_SHAPE_AREA = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / side^2


def _rgb(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32) / 255.0


def shape_coverage(shape: str, cx: torch.Tensor, cy: torch.Tensor, side: torch.Tensor, resolution: int) -> torch.Tensor:
    """Anti-aliased coverage [N, R, R] of a shape whose CENTROID is (cx, cy) (pixels, [N] each)
    and whose bounding square has side `side` [N]; pixel centres at i + 0.5. Matches
    spoxl.toy.world.render_mask to within the anti-aliasing."""
    coords = torch.arange(resolution, dtype=torch.float32, device=cx.device) + 0.5
    x = coords.view(1, 1, -1)
    y = coords.view(1, -1, 1)
    cx, cy, h = cx.view(-1, 1, 1), cy.view(-1, 1, 1), (side / 2).view(-1, 1, 1)
    if shape == "circle":
        return ((h - ((x - cx) ** 2 + (y - cy) ** 2).sqrt()) + 0.5).clamp(0, 1)
    if shape == "square":
        return ((h - (x - cx).abs() + 0.5).clamp(0, 1) * (h - (y - cy).abs() + 0.5).clamp(0, 1))
    if shape == "triangle":
        # Upward isosceles triangle: apex (cx, top), base from (cx - h, bottom) to (cx + h, bottom);
        # its centroid lies 2/3 of the height below the apex.
        top = cy - 2 * (2 * h) / 3
        bottom = top + 2 * h
        base = bottom - y  # distance inside the base edge
        # Slanted edges: |x - cx| <= h * (y - top) / (2h); signed distance to each edge line.
        slant = (h * (y - top) / (2 * h) - (x - cx).abs()) * (2 * h) / torch.sqrt((2 * h) ** 2 + h**2)
        return (torch.minimum(base, slant) + 0.5).clamp(0, 1)
    raise ValueError(f"unknown shape {shape!r}")


class ToyScorer:
    """All toy-world scores of images against captions; `kind` picks what `score` returns."""

    input = "images"

    def __init__(self, kind: str = "fidelity", scale: float = DEFAULT_SCALE):
        if kind not in SCORES:
            raise ValueError(f"unknown toy score {kind!r} (known: {', '.join(SCORES)})")
        self.kind = kind
        self.scale = float(scale)

    @property
    def reads_captions(self) -> bool:
        """Every score but the aesthetic proxy needs toy-world captions."""
        return self.kind != "aesthetic"

    def check_prompts(self, prompts: list[str]) -> None:
        """Fail before any sampling (on every rank alike) if a prompt is not a toy caption."""
        if self.reads_captions:
            for p in prompts:
                world.parse_caption(p)

    def score(self, images: torch.Tensor, prompts: list[str], timesteps) -> torch.Tensor:
        check_inputs(images, prompts)
        as_timesteps(timesteps, images.shape[0], images.device)
        if not self.reads_captions:  # any prompt will do
            return self.scale * aesthetic(images)
        return self.scale * self.similarities(images, prompts)[self.kind]

    # ---- measurements ------------------------------------------------------------------------

    def similarities(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Every score's similarity in [-1, 1], [N] each (unscaled)."""
        check_inputs(images, prompts)
        scenes = [world.parse_caption(p) for p in prompts]
        rgb = ((images.detach().float() + 1) / 2).clamp(0, 1)
        n, _, res, _ = rgb.shape
        dev = rgb.device
        bg = torch.stack([_rgb(world.BACKGROUNDS[s.background]) for s in scenes]).to(dev)[:, :, None, None]
        fg_colour = torch.stack([_rgb(world.COLOURS[s.colour]) for s in scenes]).to(dev)[:, :, None, None]

        w = foreground(rgb, bg)  # [N, R, R]
        mass = w.flatten(1).sum(1)
        out: dict[str, torch.Tensor] = {}

        colour_dist = (rgb - fg_colour).norm(dim=1) / math.sqrt(3)
        out["colour"] = 1 - 2 * ((w * colour_dist).flatten(1).sum(1) + 1) / (mass + 1)

        coords = torch.arange(res, dtype=torch.float32, device=dev) + 0.5
        safe = mass.clamp_min(1e-6)
        cx = (w.sum(1) * coords).sum(1) / safe
        cy = (w.sum(2) * coords).sum(1) / safe
        target = torch.tensor([_centroid(s, res) for s in scenes], device=dev)
        dist = ((cx - target[:, 0]) ** 2 + (cy - target[:, 1]) ** 2).sqrt()
        out["position"] = torch.where(mass > 0.5, 1 - 2 * (dist / (res / 2)).clamp(max=1), torch.full_like(dist, -1.0))

        named_area = torch.tensor([_SHAPE_AREA[s.shape] * (world.SIZES[s.size] * res) ** 2 for s in scenes], device=dev)
        log_ratio = (mass.clamp_min(1.0) / named_area).log().abs()
        out["size"] = 1 - 2 * (log_ratio / math.log(4)).clamp(max=1)

        out["shape"] = torch.empty(n, device=dev)
        for shape in world.SHAPES:
            rows = [i for i, s in enumerate(scenes) if s.shape == shape]
            if rows:
                out["shape"][rows] = 2 * soft_iou(w[rows], shape, cx[rows], cy[rows], mass[rows]) - 1

        ring = torch.cat([rgb[:, :, 0], rgb[:, :, -1], rgb[:, :, 1:-1, 0], rgb[:, :, 1:-1, -1]], dim=2)  # [N, 3, P]
        out["background"] = 1 - 2 * ((ring - bg[:, :, :, 0]).norm(dim=1) / math.sqrt(3)).mean(1)

        out["fidelity"] = torch.stack([out[a] for a in ATTRIBUTES]).mean(0)
        out["aesthetic"] = aesthetic(images)
        return out

    def attributes(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Every score, scaled ([N] each): what eval reports per attribute."""
        return {k: self.scale * v for k, v in self.similarities(images, prompts).items()}

    def correct(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Right/wrong calls per attribute ([N] bool each): the foreground's mean colour is nearest
        the named colour; the named shape fits best; the centroid is nearest the named position;
        the area is nearest the named size."""
        scenes = [world.parse_caption(p) for p in prompts]
        pred = classify(images, [s.background for s in scenes])
        return {a: torch.tensor([getattr(p, a) == getattr(s, a) for p, s in zip(pred, scenes)])
                for a in ("colour", "shape", "position", "size")}


def aesthetic(images: torch.Tensor) -> torch.Tensor:
    """The caption-free aesthetic similarity [N]: 1 - 2 min(1, mean distance of each pixel to the
    world's nearest palette colour / AESTHETIC_DISTANCE)."""
    rgb = ((images.detach().float() + 1) / 2).clamp(0, 1)
    palette = torch.stack([_rgb(v) for v in (*world.COLOURS.values(), *world.BACKGROUNDS.values())]).to(rgb.device)
    nearest = (rgb[:, None] - palette[None, :, :, None, None]).norm(dim=2).min(dim=1).values  # [N, R, R]
    return 1 - 2 * (nearest.flatten(1).mean(1) / AESTHETIC_DISTANCE).clamp(max=1)


def foreground(rgb: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """Soft foreground weights [N, R, R] of images rgb [N, 3, R, R] in [0, 1] against bg [N, 3, 1, 1]."""
    dist = (rgb - bg).norm(dim=1)
    return ((dist - FOREGROUND_DEADZONE) / (FOREGROUND_DISTANCE - FOREGROUND_DEADZONE)).clamp(0, 1)


def _centroid(scene: world.Scene, res: int) -> tuple[float, float]:
    """Where the named shape's centroid lies when drawn exactly (the triangle's is below its box
    centre)."""
    p = world.placement(scene, res)
    if scene.shape == "triangle":
        return p.cx, p.cy - p.side / 2 + 2 * p.side / 3
    return p.cx, p.cy


def soft_iou(w: torch.Tensor, shape: str, cx: torch.Tensor, cy: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """IoU of soft masks w [N, R, R] with `shape` drawn at the measured centroid and area."""
    side = (mass.clamp_min(1.0) / _SHAPE_AREA[shape]).sqrt()
    template = shape_coverage(shape, cx, cy, side, w.shape[-1])
    inter = torch.minimum(w, template).flatten(1).sum(1)
    union = torch.maximum(w, template).flatten(1).sum(1).clamp_min(1e-6)
    return inter / union


class Prediction:
    """What an image shows, as the nearest toy attributes."""

    def __init__(self, colour: str, shape: str, position: str, size: str):
        self.colour, self.shape, self.position, self.size = colour, shape, position, size


@torch.no_grad()
def classify(images: torch.Tensor, backgrounds: list[str]) -> list[Prediction]:
    """The nearest colour, best-fitting shape, nearest position and size of each image's
    foreground (against the given background)."""
    rgb = ((images.detach().float() + 1) / 2).clamp(0, 1)
    n, _, res, _ = rgb.shape
    dev = rgb.device
    bg = torch.stack([_rgb(world.BACKGROUNDS[b]) for b in backgrounds]).to(dev)[:, :, None, None]
    w = foreground(rgb, bg)
    mass = w.flatten(1).sum(1)
    safe = mass.clamp_min(1e-6)
    coords = torch.arange(res, dtype=torch.float32, device=dev) + 0.5
    cx = (w.sum(1) * coords).sum(1) / safe
    cy = (w.sum(2) * coords).sum(1) / safe
    mean_rgb = (rgb * w[:, None]).flatten(2).sum(2) / safe[:, None]  # [N, 3]
    names = list(world.COLOURS)
    colour_table = torch.stack([_rgb(world.COLOURS[c]) for c in names]).to(dev)
    colour_idx = torch.cdist(mean_rgb, colour_table).argmin(1)
    ious = torch.stack([soft_iou(w, s, cx, cy, mass) for s in world.SHAPES], dim=1)
    shape_idx = ious.argmax(1)
    out = []
    for i in range(n):
        shape = world.SHAPES[int(shape_idx[i])]
        # Position and size are judged against where that shape's centroid and area would be.
        best_pos = min(world.POSITIONS, key=lambda p: _dist2(_centroid(world.Scene("red", shape, p, "small", "black"), res),
                                                              (float(cx[i]), float(cy[i]))))
        best_size = min(world.SIZES, key=lambda z: abs(math.log(max(float(mass[i]), 1.0)
                                                                / (_SHAPE_AREA[shape] * (world.SIZES[z] * res) ** 2))))
        out.append(Prediction(names[int(colour_idx[i])], shape, best_pos, best_size))
    return out


def _dist2(a, b) -> float:
    return (a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2


def build(kind: str):
    """A factory per score name for spoxl.models.scorers.SCORERS (kind 'fidelity', 'toy_colour', ...)."""
    def make(scale: float = DEFAULT_SCALE) -> ToyScorer:
        return ToyScorer(kind, scale)
    make.__name__ = f"ToyScorer[{kind}]"
    return make
