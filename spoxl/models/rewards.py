"""Real reward models, loaded from local paths only, with the scorer interface of
spoxl.models.preference (score(images in [-1, 1], prompts, timesteps) -> [N]): usable by
`spoxl eval --scorer NAME` and as an SPO preference model (they ignore the timestep, so there they
judge the predicted x0 as it is; a trained step-aware model is the paper's choice).

  pickscore        a transformers CLIPModel folder with its tokenizer (PickScore_v1): score =
                   logit_scale.exp() * cos(image, text), PickScore's own definition (~100 x cos,
                   the scale SPO's threshold assumes).
  laion_aesthetic  a CLIP ViT-L/14 CLIPModel folder plus the LAION improved-aesthetic-predictor MLP
                   (sac+logos+ava1-l14-linearMSE.pth: Linear 768-1024-128-64-16-1, dropouts
                   between): score = MLP(L2-normalised image embedding), the 1-10 rating scale,
                   times `scale` (default 1). The prompt is not used.

  hpsv2, hpsv2.1   the released HPSv2 checkpoint (open_clip ViT-H-14) in transformers' CLIPModel, with a
                   CLIP tokenizer folder: 100 x cos(image, text) (spoxl.models.hpsv2).
  imagereward      the released ImageReward.pt (BLIP ViT-L + cross-attending BERT + MLP) in transformers'
                   BLIP parts, with a bert-base-uncased tokenizer folder: the standardised reward
                   (spoxl.models.imagereward).

None needs a package beyond spoxl's own requirements: each is a key map onto transformers' classes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spoxl.errors import SpoxlError
from spoxl.models.preference import StepAwareCLIP
from spoxl.models.preference_io import check_inputs, clip_pixel_values

class PickScore:
    """PickScore (or any CLIP) as a reward: the step-aware CLIP's untimed score, i.e. the plain CLIP."""

    input = "images"

    def __init__(self, path):
        self.model = StepAwareCLIP.from_pretrained(path)  # no SPM weights: the time conditioning stays unused

    def to(self, device=None, dtype=None):
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps=None) -> torch.Tensor:
        return self.model.untimed_score(images, prompts)


def aesthetic_mlp(width: int) -> nn.Sequential:
    """The LAION improved-aesthetic-predictor head, module for module (its state-dict keys:
    layers.0, .2, .4, .6, .7)."""
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))  # fmt: skip


class LaionAesthetic:
    input = "images"

    def __init__(self, path, weights, scale: float = 1.0):
        from transformers import CLIPModel

        path, weights = Path(path), Path(weights) if weights else None
        if not (path / "config.json").is_file():
            raise SpoxlError(f"laion_aesthetic: CLIP folder {path} has no config.json")
        if weights is None or not weights.is_file():
            raise SpoxlError(f"laion_aesthetic needs the predictor's MLP weights (--scorer-weights / "
                             f"preference.weights): {weights} does not exist")  # fmt: skip
        try:
            self.clip = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise SpoxlError(f"laion_aesthetic: could not load CLIP {path}: {str(e).splitlines()[0]}") from None
        self.mlp = aesthetic_mlp(self.clip.config.projection_dim).eval()
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SpoxlError(f"laion_aesthetic: {weights} is not a torch state dict ({str(e).splitlines()[0][:100]})") from None
        state = {k[len("layers."):] if k.startswith("layers.") else k: v for k, v in state.items()}
        own = self.mlp.state_dict()
        if state.keys() != own.keys():
            odd = sorted(state.keys() ^ own.keys())[0]
            raise SpoxlError(f"laion_aesthetic: {weights} does not fit the predictor head (key {odd})")
        for k, v in state.items():
            if v.shape != own[k].shape:
                raise SpoxlError(f"laion_aesthetic: {weights} key layers.{k} has shape {tuple(v.shape)}, the "
                                 f"head needs {tuple(own[k].shape)} (a ViT-L/14 CLIP has 768-wide embeddings)")
        self.mlp.load_state_dict(state)
        self.scale = float(scale)
        self.image_size = self.clip.config.vision_config.image_size

    def to(self, device=None, dtype=None):
        self.clip.to(device=device, dtype=dtype)
        self.mlp.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps=None) -> torch.Tensor:
        check_inputs(images, prompts)
        dtype = next(self.clip.parameters()).dtype
        out = self.clip.get_image_features(pixel_values=clip_pixel_values(images, self.image_size, dtype))
        emb = out.pooler_output if hasattr(out, "pooler_output") else out
        emb = F.normalize(emb.float(), dim=-1).to(next(self.mlp.parameters()).dtype)
        return self.scale * self.mlp(emb).squeeze(-1).float()
