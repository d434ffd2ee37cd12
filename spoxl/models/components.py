"""The bundle of SDXL parts every spoxl job works with."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class SDXLComponents:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    text_encoder_2: Any  # transformers CLIPTextModelWithProjection
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any  # diffusers DDIMScheduler (its config holds alphas_cumprod's definition)
    # The CFG negative of an empty prompt: zeros (SDXL base's model_index.json, and diffusers'
    # StableDiffusionXLPipeline default) or the encoded "" (a model trained with "" as its
    # unconditional caption, such as the toy model). Read from model_index.json by load_sdxl;
    # the in-code tiny model keeps the encoded "".
    force_zeros_for_empty_prompt: bool = False

    MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")

    def to(self, device=None, dtype: torch.dtype | None = None) -> "SDXLComponents":
        for name in self.MODEL_PARTS:
            part = getattr(self, name)
            # Skip no-op casts: diffusers warns on every .to(dtype) even when nothing changes.
            if dtype is not None and next(part.parameters()).dtype != dtype:
                part.to(device=device, dtype=dtype)
            elif device is not None:
                part.to(device=device)
        return self

    def freeze_frozen_parts(self) -> "SDXLComponents":
        """VAE and text encoders are never trained by spoxl: no grads, eval mode."""
        for name in ("vae", "text_encoder", "text_encoder_2"):
            part = getattr(self, name)
            part.requires_grad_(False)
            part.eval()
        return self

    def save_pretrained(self, path) -> None:
        """Write a diffusers-format SDXL folder (the layout StableDiffusionXLPipeline loads)."""
        from pathlib import Path

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for f in fields(self):
            if f.name != "force_zeros_for_empty_prompt":
                getattr(self, f.name).save_pretrained(path / f.name)
        (path / "model_index.json").write_text(
            _MODEL_INDEX.replace("FORCE_ZEROS", "true" if self.force_zeros_for_empty_prompt else "false"))


_MODEL_INDEX = """{
  "_class_name": "StableDiffusionXLPipeline",
  "_diffusers_version": "0.42.1",
  "force_zeros_for_empty_prompt": FORCE_ZEROS,
  "scheduler": ["diffusers", "DDIMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "tokenizer_2": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"""
