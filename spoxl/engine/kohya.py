"""LoRA files in kohya sd-scripts' naming, the one every UI loads.

SD1.5 (a UNet without SDXL's text_time conditioning): sd-scripts trains SD1.x on a diffusers-layout
UNet, so its names are `lora_unet_` + the diffusers module path with dots as underscores
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`), metadata sd_v1.
SDXL, below:

sd-scripts trains SDXL on the original (SGM / "ldm") UNet layout and names a LoRA module
`lora_unet_` + its SGM module path with dots as underscores, e.g. diffusers'
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` is
`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`. sd-scripts' own tools
(sdxl_merge_lora.py) and A1111/Forge match those names; ComfyUI maps them too. diffusers'
convert_state_dict_to_kohya keeps diffusers' block names (`lora_unet_down_blocks_1_...`), which
ComfyUI and Forge accept but sd-scripts finds nothing in (ecosystem.md, interop findings).

Per module: `<name>.lora_down.weight` (peft lora_A), `<name>.lora_up.weight` (lora_B), `<name>.alpha`
(a float32 scalar; == rank, because spoxl folds the LoRA scaling into lora_B, see
spoxl.engine.export). Metadata: the `ss_*` keys A1111 reads (network module, dim, alpha, base
model version, so the file is listed for SDXL checkpoints) and the modelspec architecture.

The block arithmetic (diffusers -> SGM), with L = layers_per_block:
  down_blocks.i.resnets.j / attentions.j  -> input_blocks.(i(L+1)+j+1).0 / .1
  down_blocks.i.downsamplers.0.conv       -> input_blocks.((i+1)(L+1)).0.op
  mid_block.resnets.j / attentions.0      -> middle_block.(2j) / middle_block.1
  up_blocks.i.resnets.j / attentions.j    -> output_blocks.(i(L+1)+j).0 / .1
  up_blocks.i.upsamplers.0.conv           -> output_blocks.(i(L+1)+L).(2 with attentions, else 1).conv
and inside a resnet: norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut -> in_layers.0/in_layers.2/
emb_layers.1/out_layers.0/out_layers.3/skip_connection. Transformer blocks keep their names.
"""

from __future__ import annotations

import torch

from spoxl.errors import SpoxlError

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
SDXL_BASE_VERSION = "sdxl_base_v1-0"
SD15_BASE_VERSION = "sd_v1"


def _resnet_part(rest: list[str], module: str) -> str:
    if not rest or rest[0] not in RESNET:
        raise SpoxlError(f"no kohya SDXL name for UNet module {module}")
    return ".".join([RESNET[rest[0]], *rest[1:]])


def sgm_module_name(module: str, unet_config) -> str:
    """The SGM (original SDXL UNet) path of a diffusers UNet module path."""
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    per = int(unet_config.layers_per_block if not isinstance(unet_config.layers_per_block, (list, tuple))
              else unet_config.layers_per_block[0]) + 1  # SGM blocks per diffusers down/up block
    parts = module.split(".")
    try:
        if parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "resnets":
                return f"input_blocks.{i * per + j + 1}.0.{_resnet_part(rest, module)}"
            if kind == "attentions":
                return f"input_blocks.{i * per + j + 1}.1.{'.'.join(rest)}"
            if kind == "downsamplers" and rest == ["conv"]:
                return f"input_blocks.{(i + 1) * per}.0.op"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), parts[3:]
            if kind == "resnets":
                return f"middle_block.{2 * j}.{_resnet_part(rest, module)}"
            if kind == "attentions":
                return f"middle_block.1.{'.'.join(rest)}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
            if kind == "resnets":
                return f"output_blocks.{i * per + j}.0.{_resnet_part(rest, module)}"
            if kind == "attentions":
                return f"output_blocks.{i * per + j}.1.{'.'.join(rest)}"
            if kind == "upsamplers" and rest == ["conv"]:
                has_attention = unet_config.up_block_types[i].startswith("CrossAttn")
                return f"output_blocks.{i * per + per - 1}.{2 if has_attention else 1}.conv"
    except (IndexError, ValueError):
        pass
    raise SpoxlError(f"no kohya SDXL name for UNet module {module}")


def is_sdxl_unet(unet_config) -> bool:
    return getattr(unet_config, "addition_embed_type", None) == "text_time"


def kohya_name(module: str, unet_config) -> str:
    path = sgm_module_name(module, unet_config) if is_sdxl_unet(unet_config) else module
    return "lora_unet_" + path.replace(".", "_")


def kohya_state_dict(peft_state: dict[str, torch.Tensor], unet_config, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """peft LoRA keys (`<module>.lora_A.weight` / `.lora_B.weight`, alpha == rank) -> sd-scripts SDXL keys."""
    out: dict[str, torch.Tensor] = {}
    for key, value in peft_state.items():
        for peft_part, kohya_part in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
            if key.endswith(peft_part):
                module = key[: -len(peft_part)]
                name = kohya_name(module, unet_config)
                out[name + kohya_part] = value.to(dtype).contiguous()
                if peft_part == ".lora_A.weight":
                    out[name + ".alpha"] = torch.tensor(float(value.shape[0]), dtype=torch.float32)  # alpha == rank
                break
        else:
            raise SpoxlError(f"unexpected LoRA tensor {key} (expected lora_A / lora_B weights)")
    return out


def kohya_metadata(peft_state: dict[str, torch.Tensor], unet_config=None) -> dict[str, str]:
    """The safetensors metadata A1111/Forge and sd-scripts read (strings only); SDXL unless
    `unet_config` is an SD1.x UNet's."""
    from spoxl import __version__

    ranks = sorted({int(v.shape[0]) for k, v in peft_state.items() if k.endswith(".lora_A.weight")})
    rank = ranks[-1] if ranks else 0
    sdxl = unet_config is None or is_sdxl_unet(unet_config)
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_base_model_version": SDXL_BASE_VERSION if sdxl else SD15_BASE_VERSION,
        "ss_v2": "False",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora",
        "modelspec.sai_model_spec": "1.0.0",
        "spoxl_version": __version__,
    }
