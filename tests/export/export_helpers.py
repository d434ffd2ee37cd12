"""Shared by the export tests and the ZeRO-3 launcher script: a 'trained' LoRA UNet and its inputs."""

from __future__ import annotations

import copy

import torch

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]


def lora_unet(base_unet, r: int = 4, alpha: int = 8, seed: int = 1):
    """A copy of `base_unet` with a LoRA whose weights are all non-zero (as after training).

    alpha != r on purpose: the export must carry the scaling (alpha / r = 2) correctly.
    """
    from peft import LoraConfig

    unet = copy.deepcopy(base_unet)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return unet


def unet_inputs(unet, batch: int = 2, seed: int = 0) -> dict:
    """Deterministic random UNet inputs shaped for `unet`'s config."""
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    size = cfg.sample_size
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return dict(
        sample=torch.randn(batch, cfg.in_channels, size, size, generator=g),
        timestep=torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2)),
        encoder_hidden_states=torch.randn(batch, 7, cfg.cross_attention_dim, generator=g),
        added_cond_kwargs={
            "text_embeds": torch.randn(batch, pooled_dim, generator=g),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        },
    )


@torch.no_grad()
def unet_out(unet, inputs) -> torch.Tensor:
    unet.eval()
    return unet(**inputs, return_dict=False)[0]
