"""The bundle of model parts every spoxl job works with: SDXL, or SD1.5 (one text encoder).

SD1.5 is the same bundle with text_encoder_2 and tokenizer_2 set to None; the rest of spoxl tells
the two apart by `architecture` (and, downstream of prompt encoding, by the pooled embedding being
empty: SD1.5's UNet takes no added conditioning).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class SDXLComponents:
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    text_encoder_2: Any  # transformers CLIPTextModelWithProjection; None for SD1.5
    tokenizer: Any
    tokenizer_2: Any  # None for SD1.5
    scheduler: Any  # diffusers DDIMScheduler (its config holds alphas_cumprod's definition)
    # The CFG negative of an empty prompt: zeros (SDXL base's model_index.json, and diffusers'
    # StableDiffusionXLPipeline default) or the encoded "" (a model trained with "" as its
    # unconditional caption, such as the toy model). Read from model_index.json by load_sdxl;
    # the in-code tiny model keeps the encoded "".
    force_zeros_for_empty_prompt: bool = False

    MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
    # Set when the text encoders are offloaded (model.offload_text_encoders): they live in host
    # memory and visit this device only while encoding (text_encoders_ready). Not a field: not a
    # model part, never saved.
    text_encoder_device = None

    @property
    def architecture(self) -> str:
        """"sdxl" (two text encoders, text_time added conditioning) or "sd15" (one, none)."""
        return "sd15" if self.text_encoder_2 is None else "sdxl"

    def frozen_part_names(self) -> tuple[str, ...]:
        """The parts spoxl never trains (VAE and the text encoders this architecture has)."""
        return ("vae", "text_encoder") + (("text_encoder_2",) if self.text_encoder_2 is not None else ())

    @contextmanager
    def text_encoders_ready(self):
        """The text encoders on the device they compute on for the duration of the block; offloaded
        ones (text_encoder_device set) go back to the CPU after it. At SDXL size they are 1.6 GB in
        bf16 that sampling and training otherwise hold on the accelerator between encodes."""
        if self.text_encoder_device is None:
            yield
            return
        parts = [p for p in (self.text_encoder, self.text_encoder_2) if p is not None]
        for part in parts:
            part.to(self.text_encoder_device)
        try:
            yield
        finally:
            for part in parts:
                part.to("cpu")

    def to(self, device=None, dtype: torch.dtype | None = None) -> "SDXLComponents":
        for name in ("unet", *self.frozen_part_names()):
            part = getattr(self, name)
            if part is None:  # a UNet not built yet (ZeRO-3 builds it partitioned)
                continue
            # Skip no-op casts: diffusers warns on every .to(dtype) even when nothing changes.
            if dtype is not None and next(part.parameters()).dtype != dtype:
                part.to(device=device, dtype=dtype)
            elif device is not None:
                part.to(device=device)
        return self

    def freeze_frozen_parts(self) -> "SDXLComponents":
        """VAE and text encoders are never trained by spoxl: no grads, eval mode."""
        for name in self.frozen_part_names():
            part = getattr(self, name)
            part.requires_grad_(False)
            part.eval()
        return self

    def save_pretrained(self, path) -> None:
        """Write a diffusers-format folder (the layout StableDiffusionXLPipeline, or for SD1.5
        StableDiffusionPipeline, loads)."""
        from pathlib import Path

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for f in fields(self):
            part = getattr(self, f.name)
            if f.name != "force_zeros_for_empty_prompt" and part is not None:
                part.save_pretrained(path / f.name)
        if self.architecture == "sd15":
            (path / "model_index.json").write_text(_SD15_MODEL_INDEX)
            return
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

# SD1.5's layout (runwayml/stable-diffusion-v1-5 without its safety checker).
_SD15_MODEL_INDEX = """{
  "_class_name": "StableDiffusionPipeline",
  "_diffusers_version": "0.42.1",
  "feature_extractor": [null, null],
  "requires_safety_checker": false,
  "safety_checker": [null, null],
  "scheduler": ["diffusers", "DDIMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"""
