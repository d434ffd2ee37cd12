"""Test helper: a diffusers UNet state dict renamed to the original LDM (A1111 / ComfyUI /
sd-scripts) single-file layout, written from the layout itself (not from diffusers' converter,
which the tests use as the oracle that reads it back)."""

import re

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
          "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}  # fmt: skip
TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
       "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip


def _resnet_tail(rest: str) -> str:
    part, _, leaf = rest.partition(".")
    return f"{RESNET[part]}.{leaf}"


def ldm_key(name: str, layers_per_block: int, up_has_attention: list[bool]) -> str:
    per = layers_per_block + 1  # LDM blocks per level: the resnets (+ attention) and the resampler
    for prefix, new in TOP.items():
        if name.startswith(prefix + "."):
            return "model.diffusion_model." + new + name[len(prefix):]
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", name):
        out = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_resnet_tail(m[3])}"
    elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        out = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
    elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        out = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", name):
        out = f"middle_block.{2 * int(m[1])}.{_resnet_tail(m[2])}"
    elif m := re.match(r"mid_block\.attentions\.0\.(.*)", name):
        out = f"middle_block.1.{m[1]}"
    elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", name):
        out = f"output_blocks.{int(m[1]) * (per) + int(m[2])}.0.{_resnet_tail(m[3])}"
    elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        out = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
    elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
        i = int(m[1])
        out = f"output_blocks.{i * per + per - 1}.{2 if up_has_attention[i] else 1}.conv.{m[2]}"
    else:
        raise KeyError(name)
    return "model.diffusion_model." + out


def to_ldm(state: dict, config: dict) -> dict:
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    return {ldm_key(k, config["layers_per_block"], up_attn): v for k, v in state.items()}
