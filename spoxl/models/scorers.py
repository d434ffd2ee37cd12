"""Programmatic step-aware preference scorers: for runs (CPU demo, tests) with no trained model.

Each scorer is a plain function of the decoded predicted x0 (images in [-1, 1]) and the prompt.
They are step-aware by construction: the pool sampler feeds them the predicted x0 of a candidate at
that candidate's timestep, and the predicted x0 at a noisy step is blurrier/greyer than at the end,
so the same candidate scores differently depending on t. The timestep argument is accepted (one
per image, validated) to keep the one interface of spoxl.models.preference_io.

Scale. SPO keeps a pair when the 2-way softmax gap of the best and worst raw scores exceeds a
threshold tau: softmax_w - softmax_l = tanh((s_w - s_l) / 2), so the pair is kept iff
s_w - s_l > 2 * atanh(tau) (0.85 for tau = 0.4, 0.62 for tau = 0.3). PickScore's raw scores are
logit_scale.exp() (~100) times a cosine similarity; these scorers use the same convention:
score = scale * (a similarity in [-1, 1]), default scale 100, so a threshold means what it means in
the official recipe: tau = 0.4 keeps pairs whose similarity differs by more than ~0.0085.
"""

from __future__ import annotations

import torch

from spoxl.errors import SpoxlError
from spoxl.models.preference_io import as_timesteps, check_inputs

# Target colours (RGB in [0, 1]) that a prompt can name; the first one named wins.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "purple": (0.5, 0.0, 0.5),
    "orange": (1.0, 0.5, 0.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "grey": (0.5, 0.5, 0.5),
    "gray": (0.5, 0.5, 0.5),
}
DEFAULT_SCALE = 100.0


def prompt_colour(prompt: str) -> tuple[float, float, float]:
    """The target colour named in a prompt (first colour word), or a one-line error."""
    for word in prompt.lower().replace(",", " ").replace(".", " ").split():
        if word in COLOURS:
            return COLOURS[word]
    raise SpoxlError(f"colour scorer: prompt {prompt!r} names no colour (known: {', '.join(COLOURS)})")


class ColourScorer:
    """How close the image's pixels are to the colour named in the prompt.

    similarity = 1 - 2 * mean_pixels(||rgb - target|| / sqrt(3)), in [-1, 1] (1: every pixel is
    exactly the target colour); score = scale * similarity.
    """

    input = "images"

    def __init__(self, scale: float = DEFAULT_SCALE):
        self.scale = float(scale)

    def check_prompts(self, prompts: list[str]) -> None:
        """Fail before any sampling (on every rank alike) if a prompt names no colour."""
        for p in prompts:
            prompt_colour(p)

    def score(self, images: torch.Tensor, prompts: list[str], timesteps) -> torch.Tensor:
        check_inputs(images, prompts)
        as_timesteps(timesteps, images.shape[0], images.device)
        rgb = ((images.float() + 1) / 2).clamp(0, 1)
        target = torch.tensor([prompt_colour(p) for p in prompts], device=images.device)
        dist = (rgb - target[:, :, None, None]).norm(dim=1) / 3**0.5  # [N, H, W] in [0, 1]
        return self.scale * (1 - 2 * dist.flatten(1).mean(1))


class BrightnessScorer:
    """Mean luminance, rewarded towards "bright"/"light" prompts and penalised for "dark" ones
    (prompts naming neither reward brightness). similarity = +-(2 * luma - 1)."""

    input = "images"
    DARK_WORDS = ("dark", "night", "black", "dim")

    def __init__(self, scale: float = DEFAULT_SCALE):
        self.scale = float(scale)

    def score(self, images: torch.Tensor, prompts: list[str], timesteps) -> torch.Tensor:
        check_inputs(images, prompts)
        as_timesteps(timesteps, images.shape[0], images.device)
        rgb = ((images.float() + 1) / 2).clamp(0, 1)
        luma = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).flatten(1).mean(1)
        sign = torch.tensor(
            [-1.0 if any(w in p.lower().split() for w in self.DARK_WORDS) else 1.0 for p in prompts],
            device=images.device,
        )
        return self.scale * sign * (2 * luma - 1)


SCORERS = {"colour": ColourScorer, "color": ColourScorer, "brightness": BrightnessScorer}
