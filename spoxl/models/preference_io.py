"""The one interface every preference model and scorer shares, and its input helpers.

score(x, prompts, timesteps) -> [N] scores, x decoded images in [-1, 1] ([N, 3, H, W]) or latents
(`input` says which); timesteps raw DDIM timesteps (0..999; 0 for final images), one per image.
The models (spoxl.models.preference, .scorers, .rewards, .hpsv2, .imagereward, spoxl.toy.scorers)
import these helpers from here; spoxl.preference_models builds any of them by name.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from spoxl.errors import SpoxlError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class PreferenceModel(Protocol):
    """What the pool sampler needs from a preference model.

    `input` says what `score` takes: "images" (VAE-decoded predicted x0 in [-1, 1]) or "latents"
    (the predicted x0 latents themselves, no decode).
    """

    input: str

    def score(self, x: torch.Tensor, prompts: list[str], timesteps) -> torch.Tensor: ...


def as_timesteps(timesteps, n: int, device=None) -> torch.Tensor:
    """An int or [N] tensor of timesteps as a float [N] tensor (one per image)."""
    t = torch.as_tensor(timesteps, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise SpoxlError(f"got {tuple(t.shape)} timesteps for {n} images (need one per image)")
    return t


def check_inputs(x: torch.Tensor, prompts: list[str]) -> None:
    if x.ndim != 4:
        raise SpoxlError(f"preference model input must be [N, C, H, W], got shape {tuple(x.shape)}")
    if len(prompts) != x.shape[0]:
        raise SpoxlError(f"preference model got {x.shape[0]} inputs but {len(prompts)} prompts")


def clip_pixel_values(images: torch.Tensor, size: int, dtype=torch.float32) -> torch.Tensor:
    """[-1, 1] images -> CLIP pixel values: bicubic resize (shortest side), centre crop, [0, 1]
    clamped, CLIP mean/std (every CLIP-based scorer in spoxl: the SPM, PickScore, the LAION
    predictor, HPSv2, ImageReward). The clamp is the official SPM's (it resizes, then clamps to
    [0, 1]); the PIL pipelines of the other scorers resize 8-bit images, which clamps the same
    bicubic overshoot."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    x = images.float()
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = ((x[..., top : top + size, left : left + size] + 1) / 2).clamp(0, 1)
    mean, std = _clip_norm(x.device)
    return ((x - mean) / std).to(dtype)


_CLIP_NORM: dict = {}


def _clip_norm(device) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean and std as [1, 3, 1, 1] tensors on `device`, made once per device (the sampler
    scores every segment: no host-to-device copy each time)."""
    key = str(device)
    if key not in _CLIP_NORM:
        _CLIP_NORM[key] = (torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1),
                           torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1))  # fmt: skip
    return _CLIP_NORM[key]


def load_strict(model, state: dict, *, what: str, file, into: str) -> None:
    """Load `state` into `model` with exactly its keys (position_ids buffers aside) and shapes,
    else a one-line SpoxlError naming the first odd key or the shape mismatch."""
    own = {k for k in model.state_dict() if not k.endswith("position_ids")}
    if state.keys() != own:
        odd = sorted(state.keys() ^ own)[0]
        raise SpoxlError(f"{what}: {file} does not load strictly into {into} (key {odd})")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise SpoxlError(f"{what}: {file}: {str(e).splitlines()[-1].strip()[:200]}") from None
