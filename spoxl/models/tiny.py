"""The SDXL architecture at toy size, randomly initialised from a seed.

Every piece is the real diffusers/transformers class with a small config, so code written against
the tiny model (dual text encoders, the `text_time` added conditioning, the VAE scaling factor)
runs unchanged on a real SDXL checkpoint. `spoxl make-tiny DIR` saves it as a diffusers folder
that loads through `spoxl.models.loading.load_sdxl`, the same path a real checkpoint takes.

No model hub is needed: the CLIP tokenizers are built here from a byte-level vocabulary (every
byte is a token, no merges), which tokenises any prompt deterministically. The toy-world model
(spoxl.toy.model) adds merges for its grammar's words (`tiny_clip_tokenizer(words=...)`).
"""

from __future__ import annotations

import torch

from spoxl.models.components import SDXLComponents

# Image side of the tiny model: 64 px images, 8x8 latents (the VAE keeps SDXL's factor of 8).
TINY_RESOLUTION = 64
TINY_TEXT_HIDDEN = 32  # per text encoder; the UNet sees 2 * 32 = 64 (real SDXL: 768 + 1280)
TINY_TEXT_PROJECTION = 32  # pooled embedding size of encoder 2 (real SDXL: 1280)
TINY_TIME_EMBED = 8  # addition_time_embed_dim (real SDXL: 256)
TINY_MAX_TOKENS = 77


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible byte -> printable unicode map (public algorithm)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def tiny_clip_tokenizer(pad_token: str = "<|endoftext|>", words: tuple[str, ...] = ()):
    """A CLIPTokenizer with a byte-level vocabulary: one token per byte, word ends marked.

    `words` adds BPE merges that make each of those words ONE token (the toy world's vocabulary;
    any other text still falls back to bytes). The special tokens stay the last two ids, where
    the tiny text encoders' configs expect BOS and EOS."""
    from transformers import CLIPTokenizer

    symbols = sorted(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = _word_merges(words)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    if pad_token not in vocab and pad_token not in ("<|startoftext|>", "<|endoftext|>"):
        vocab[pad_token] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)
    tok.model_max_length = TINY_MAX_TOKENS
    return tok


def _word_merges(words) -> list[tuple[str, str]]:
    """BPE merges joining each word right to left (last byte + "</w>" first), so every merge is
    (one byte, a word ending) and applying them in any rank order rebuilds exactly the word."""
    byte_symbol = _bytes_to_unicode()
    merges: list[tuple[str, str]] = []
    for word in words:
        parts = [byte_symbol[b] for b in word.encode("utf-8")]
        if len(parts) < 2:
            continue
        tail = parts[-1] + "</w>"
        for head in reversed(parts[:-1]):
            if (head, tail) not in merges:
                merges.append((head, tail))
            tail = head + tail
    return merges


def tiny_unet_config() -> dict:
    return dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        cross_attention_dim=2 * TINY_TEXT_HIDDEN,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED,
        projection_class_embeddings_input_dim=TINY_TEXT_PROJECTION + 6 * TINY_TIME_EMBED,
    )


def tiny_vae_config() -> dict:
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=TINY_RESOLUTION,
        scaling_factor=0.13025,  # SDXL's
    )


def text_config(vocab_size: int, projection: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_TOKENS,
        projection_dim=TINY_TEXT_PROJECTION if projection else 512,
        hidden_act="gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def sdxl_scheduler():
    """SDXL base's DDIM scheduler config (scaled_linear 0.00085..0.012, leading spacing, offset 1)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def tiny_sd15_unet_config() -> dict:
    """The tiny UNet in SD1.5's form: no added conditioning, cross-attention on one encoder."""
    config = tiny_unet_config()
    for key in ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"):
        config.pop(key)
    config["cross_attention_dim"] = TINY_TEXT_HIDDEN
    return config


def build_tiny_sd15(seed: int = 0) -> SDXLComponents:
    """Random tiny SD1.5-architecture components (one CLIPTextModel, no text_encoder_2, a UNet
    without added conditioning, SD1.5's VAE scaling factor); same seed, same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        unet = UNet2DConditionModel(**tiny_sd15_unet_config())
        vae = AutoencoderKL(**{**tiny_vae_config(), "scaling_factor": 0.18215})  # SD1.5's
        text_encoder = CLIPTextModel(text_config(len(tokenizer.get_vocab()), projection=False))
    return SDXLComponents(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=None,
        tokenizer=tokenizer,
        tokenizer_2=None,
        scheduler=sdxl_scheduler(),  # SD1.5's DDIM schedule is the same (scaled_linear 0.00085..0.012)
    )


def build_tiny_sdxl(seed: int = 0) -> SDXLComponents:
    """Random tiny SDXL components; the same seed gives bit-identical weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # Seed a private generator scope so building the model does not disturb the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_clip_tokenizer()
        tokenizer_2 = tiny_clip_tokenizer(pad_token="!")  # SDXL's tokenizer_2 pads with "!"
        vocab = len(tokenizer_2.get_vocab())
        unet = UNet2DConditionModel(**tiny_unet_config())
        vae = AutoencoderKL(**tiny_vae_config())
        text_encoder = CLIPTextModel(text_config(vocab, projection=False))
        text_encoder_2 = CLIPTextModelWithProjection(text_config(vocab, projection=True))
    return SDXLComponents(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=sdxl_scheduler(),
    )
