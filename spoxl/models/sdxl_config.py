"""The real SDXL base UNet's architecture (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json),
written out so that a full-size UNet can be built without a download: for benchmarks and memory
checks on random weights (benchmarks/gpu_check.py). 2,567,463,684 parameters; one forward at
1024 px (128 x 128 latents) is about 6.76 TFLOP.
"""

from __future__ import annotations

SDXL_UNET_PARAMETERS = 2_567_463_684
SDXL_FORWARD_TFLOP_1024PX = 6.76  # per latent, at 128 x 128


def sdxl_unet_config() -> dict:
    return {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 10],
        "attention_head_dim": [5, 10, 20],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
    }
