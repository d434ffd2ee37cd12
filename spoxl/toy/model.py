"""The toy model: the SDXL architecture at a size a CPU pretrains in minutes, and where it lives.

Same classes as spoxl.models.tiny (AutoencoderKL, both CLIP text encoders with the offline
byte-level tokenizers, UNet2DConditionModel with `text_time` conditioning); the UNet is wider
than the tiny one and attends to the caption at both resolutions (8x8 and 4x4 latents), which is
what binding a colour to a shape at a position needs. The text encoders are the tiny model's
configuration, frozen at their random init (spoxl trains UNets, not text encoders): the UNet
learns to read them. Their tokenizers add one BPE merge chain per word of the world's grammar, so
"red" is one token wherever it stands (with bytes only, a held-out caption is a new byte string
and the UNet memorises captions instead of composing words; other text still falls back to bytes).

The pretrained weights ship in the package (spoxl/toy/weights/, a diffusers SDXL folder loaded by
the same code as a real checkpoint); `spoxl toy pretrain` reproduces them.
"""

from __future__ import annotations

from spoxl.models import tiny
from spoxl.paths import TOY_WEIGHTS_DIR as WEIGHTS_DIR  # noqa: F401  (where the weights ship; read here by tests)


def toy_unet_config() -> dict:
    return dict(
        tiny.tiny_unet_config(),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128),
        attention_head_dim=(4, 8),
    )


def toy_vae_config() -> dict:
    return dict(tiny.tiny_vae_config(), block_out_channels=(16, 32, 32, 32))


def build_toy_base(seed: int = 0, vae=None):
    """Untrained toy components (random UNet; `vae` replaces the random VAE when given)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from spoxl.toy.world import VOCABULARY

    parts = tiny.build_tiny_sdxl(seed)  # the scheduler (and placeholders replaced below)
    parts.tokenizer = tiny.tiny_clip_tokenizer(words=VOCABULARY)
    parts.tokenizer_2 = tiny.tiny_clip_tokenizer(pad_token="!", words=VOCABULARY)
    vocab = len(parts.tokenizer_2.get_vocab())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        parts.unet = UNet2DConditionModel(**toy_unet_config()).eval()
        parts.vae = vae if vae is not None else AutoencoderKL(**toy_vae_config()).eval()
        parts.text_encoder = CLIPTextModel(tiny.text_config(vocab, projection=False)).eval()
        parts.text_encoder_2 = CLIPTextModelWithProjection(tiny.text_config(vocab, projection=True)).eval()
    return parts
