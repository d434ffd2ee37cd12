"""Prompt encoding and micro-conditioning, exactly as StableDiffusionXLPipeline (SDXL) or
StableDiffusionPipeline (SD1.5) feeds the UNet.

SDXL:
  * prompt_embeds: penultimate hidden states of text_encoder and text_encoder_2, concatenated on
    the feature axis -> [B, 77, 768 + 1280] for real SDXL;
  * pooled: the projected pooled output (text_embeds) of text_encoder_2 -> [B, 1280];
  * time_ids: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample.
SD1.5:
  * prompt_embeds: the last hidden state of its one text encoder -> [B, 77, 768];
  * pooled: EMPTY, [B, 0]: SD1.5's UNet takes no added conditioning, and an empty pooled tensor
    travels through caches, pairs and batches like SDXL's while telling the UNet call
    (spoxl.sampling.unet_eps) to pass none; time_ids are made as for SDXL and ignored.

The CFG negative is the encoded empty prompt (the SPO and Diffusion-DPO recipes), not the zero
tensor that the pipeline substitutes when no negative prompt is given at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptEmbeds:
    embeds: torch.Tensor  # [B, L, D1 + D2]
    pooled: torch.Tensor  # [B, P]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def repeat_interleave(self, n: int) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds.repeat_interleave(n, 0), self.pooled.repeat_interleave(n, 0))

    def index(self, idx) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds[idx], self.pooled[idx])

    def to(self, *args, **kwargs) -> "PromptEmbeds":
        return PromptEmbeds(self.embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    @staticmethod
    def cat(items: list["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(torch.cat([p.embeds for p in items]), torch.cat([p.pooled for p in items]))


def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


@torch.no_grad()
def encode_prompts(components, prompts: list[str]) -> PromptEmbeds:
    """Encode prompts with the model's text encoders (no grad; the encoders are frozen)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    with components.text_encoders_ready():
        return _encode(components, prompts)


def _encode(components, prompts: list[str]) -> PromptEmbeds:
    te1, te2 = components.text_encoder, components.text_encoder_2
    device = te1.device
    if te2 is None:  # SD1.5: the final layer (clip_skip None in StableDiffusionPipeline), no pooled input
        embeds = te1(_tokenize(components.tokenizer, prompts, device))[0]
        return PromptEmbeds(embeds=embeds, pooled=embeds.new_zeros(len(prompts), 0))
    out1 = te1(_tokenize(components.tokenizer, prompts, device), output_hidden_states=True)
    out2 = te2(_tokenize(components.tokenizer_2, prompts, device), output_hidden_states=True)
    # SDXL uses the penultimate layer of both encoders (clip_skip = None in the pipeline).
    embeds = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return PromptEmbeds(embeds=embeds, pooled=out2.text_embeds)


def negative_embeds(components, n: int) -> PromptEmbeds:
    """The classifier-free-guidance negative for n prompts, as diffusers' StableDiffusionXLPipeline
    makes it without a negative prompt: all zeros (sequence and pooled) when the model's
    force_zeros_for_empty_prompt is set (SDXL base), else the encoded empty prompt "". Used by
    every CFG call in spoxl: sampling, SPO's training means, SPM training, sample and eval."""
    empty = encode_prompts(components, [""])
    if getattr(components, "force_zeros_for_empty_prompt", False):
        empty = PromptEmbeds(torch.zeros_like(empty.embeds), torch.zeros_like(empty.pooled))
    return empty.repeat_interleave(n)


def encode_with_negative(components, prompts: list[str]) -> tuple[PromptEmbeds, PromptEmbeds]:
    """(positive, negative): the negative as negative_embeds, one per prompt."""
    pos = encode_prompts(components, prompts)
    return pos, negative_embeds(components, len(pos))


def make_time_ids(
    batch: int,
    original_size: tuple[int, int],
    crop_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """SDXL micro-conditioning `time_ids` [B, 6] for one (orig, crop, target) triple."""
    target_size = target_size or original_size
    row = torch.tensor([*original_size, *crop_top_left, *target_size], dtype=dtype, device=device)
    return row.expand(batch, 6).clone()
