"""The REAL SDXL base architecture with random weights ("sdxl-random[:SEED]"): for memory and speed
measurements at real size without a download (benchmarks/real_size.py).

"sdxl-narrow[:SEED]" is the same layout (blocks, transformer depths 1/2/10, text_time conditioning,
64-dim attention heads, the real text encoders and VAE) at 0.4 of the UNet's width (128/256/512
channels, 2/4/8 heads): 494 M parameters, so that full fine-tuning with its frozen reference
(~16 bytes per trained parameter) can be measured on a 24 GB CPU host with 2 ranks (half width,
0.73 B, was OOM-killed there).

The UNet, VAE and both text encoders come from the real configs bundled in spoxl/resources (the
UNet: 2,567,463,684 parameters; the text encoders 123 M and 695 M). The tokenizers are the tiny
byte-level ones (spoxl.models.tiny): the real BPE files are not shipped, and random weights make
no use of real tokens. Under ZeRO-3 the UNet is built partitioned instead (spoxl.engine.sharded),
so `with_unet=False` skips it here.
"""

from __future__ import annotations

import json
from importlib import resources

import torch

from spoxl.models.components import SDXLComponents


def bundled_config(name: str) -> dict:
    """A real SDXL part's config from spoxl/resources (sdxl_<name>_config.json)."""
    text = resources.files("spoxl.resources").joinpath(f"sdxl_{name}_config.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


# built-in name -> UNet config overrides of the real SDXL config
UNET_VARIANTS = {"sdxl-random": {}, "sdxl-narrow": {"block_out_channels": [128, 256, 512], "attention_head_dim": [2, 4, 8]}}


def unet_config(name: str = "sdxl-random") -> dict:
    """The UNet config of a built-in real-layout model (UNET_VARIANTS)."""
    return {**bundled_config("unet"), **UNET_VARIANTS[name]}


def build_random_sdxl(seed: int = 0, *, with_unet: bool = True, name: str = "sdxl-random") -> SDXLComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from spoxl.models import tiny

    tokenizer, tokenizer_2 = tiny.tiny_clip_tokenizer(), tiny.tiny_clip_tokenizer(pad_token="!")
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}

    def text_config(name):
        config = {k: v for k, v in bundled_config(name).items() if k not in ("architectures", "torch_dtype")}
        return CLIPTextConfig(**{**config, **ids, "pad_token_id": tokenizer.pad_token_id})

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the UNet first, as in the tiny factories (spoxl.engine.sharded relies on it)
        unet = UNet2DConditionModel(**unet_config(name)).eval() if with_unet else None
        vae = AutoencoderKL(**bundled_config("vae")).eval()
        text_encoder = CLIPTextModel(text_config("text_encoder")).eval()
        text_encoder_2 = CLIPTextModelWithProjection(text_config("text_encoder_2")).eval()
    return SDXLComponents(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                          tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=tiny.sdxl_scheduler(),
                          force_zeros_for_empty_prompt=True)  # fmt: skip
