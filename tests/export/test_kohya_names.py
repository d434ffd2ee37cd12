"""The kohya-format LoRA uses sd-scripts' own SDXL module names, so sd-scripts (sdxl_merge_lora),
A1111/Forge and ComfyUI find every module.

Two independent checks of spoxl.engine.kohya's block arithmetic:
  * the names of known SDXL modules, written out by hand from the SGM (original) SDXL UNet layout
    sd-scripts uses (input_blocks 1-8, middle_block 0-2, output_blocks 0-8, resnets at .0,
    transformers at .1, samplers at .op / .2.conv), and every LoRA-able module of the real SDXL
    UNet mapping to a distinct name;
  * diffusers' own converter of sd-scripts' names (lora_state_dict with unet_config) mapping a
    file with wide target_modules (attention, feed-forward, proj_in/out, resnet convs, time
    projections, down/up samplers) back onto the tiny UNet: the loaded LoRA reproduces the
    trained module's output exactly, so no key went to the wrong module or was dropped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from export_helpers import unet_inputs, unet_out  # noqa: E402

from spoxl.engine.export import KOHYA_FILE, export_all  # noqa: E402
from spoxl.engine.kohya import kohya_name  # noqa: E402
from spoxl.errors import SpoxlError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

SDXL_NAMES = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_out.0": "lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_out_0",
    "down_blocks.2.attentions.0.proj_in": "lora_unet_input_blocks_7_1_proj_in",
    "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.0.proj": "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_0_proj",
    "mid_block.attentions.0.transformer_blocks.0.attn1.to_k": "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_k",
    "mid_block.resnets.0.conv1": "lora_unet_middle_block_0_in_layers_2",
    "mid_block.resnets.1.time_emb_proj": "lora_unet_middle_block_2_emb_layers_1",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v": "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_v",
    "up_blocks.0.attentions.2.proj_out": "lora_unet_output_blocks_2_1_proj_out",
    "up_blocks.1.attentions.0.transformer_blocks.1.ff.net.2": "lora_unet_output_blocks_3_1_transformer_blocks_1_ff_net_2",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_q": "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_q",
    "up_blocks.2.resnets.2.conv2": "lora_unet_output_blocks_8_0_out_layers_3",
    "up_blocks.0.resnets.0.conv_shortcut": "lora_unet_output_blocks_0_0_skip_connection",
    "down_blocks.0.resnets.1.conv1": "lora_unet_input_blocks_2_0_in_layers_2",
    "down_blocks.0.downsamplers.0.conv": "lora_unet_input_blocks_3_0_op",
    "down_blocks.1.downsamplers.0.conv": "lora_unet_input_blocks_6_0_op",
    "up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_2_2_conv",
    "up_blocks.1.upsamplers.0.conv": "lora_unet_output_blocks_5_2_conv",
    "conv_in": "lora_unet_input_blocks_0_0",
    "time_embedding.linear_1": "lora_unet_time_embed_0",
    "add_embedding.linear_2": "lora_unet_label_emb_0_2",
    "conv_out": "lora_unet_out_2",
}


@pytest.fixture(scope="module")
def sdxl_unet():
    from diffusers import UNet2DConditionModel

    config = json.loads((REPO / "spoxl" / "resources" / "sdxl_unet_config.json").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def test_sdxl_modules_get_sd_scripts_names(sdxl_unet):
    for module, expected in SDXL_NAMES.items():
        assert kohya_name(module, sdxl_unet.config) == expected, module


def test_every_sdxl_lora_module_gets_its_own_name(sdxl_unet):
    modules = [n for n, m in sdxl_unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    names = [kohya_name(n, sdxl_unet.config) for n in modules]
    assert len(modules) > 700 and len(set(names)) == len(names)


def test_an_unknown_module_is_a_one_line_error(sdxl_unet):
    with pytest.raises(SpoxlError, match="no kohya SDXL name for UNet module down_blocks.0.weird"):
        kohya_name("down_blocks.0.weird.0.x", sdxl_unet.config)


WIDE = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
        "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]


@pytest.mark.parametrize("targets", [["to_q", "to_k", "to_v", "to_out.0"], WIDE], ids=["default", "wide"])
def test_kohya_file_loads_back_through_diffusers_sgm_converter(tiny_components, tmp_path, targets):
    import copy

    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from spoxl.models.lora import load_lora_into_unet

    unet = copy.deepcopy(tiny_components.unet).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    inputs = unet_inputs(unet)
    expected = unet_out(unet, inputs)
    assert (expected - unet_out(tiny_components.unet, inputs)).abs().max() > 1e-2  # the LoRA does something

    paths = export_all(unet, tmp_path, formats=("kohya",))
    sd = load_file(str(paths["kohya"]))
    modules = {k.rsplit(".", 2)[0] for k in sd if k.endswith(".lora_down.weight")}
    lora_layers = {n for n, m in unet.named_modules() if hasattr(m, "lora_A")}
    assert len(modules) == len(lora_layers) > 0
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block" in k for k in sd)
    assert all(sd[m + ".alpha"].dtype == torch.float32 and sd[m + ".alpha"].ndim == 0 for m in modules)

    fresh = UNet2DConditionModel.from_config(unet.config)
    fresh.load_state_dict(tiny_components.unet.state_dict())
    load_lora_into_unet(fresh, paths["kohya"])
    torch.testing.assert_close(unet_out(fresh, inputs), expected, atol=1e-5, rtol=1e-4)


def test_kohya_metadata_and_fp16(tiny_components, tmp_path):
    import copy

    from peft import LoraConfig

    unet = copy.deepcopy(tiny_components.unet).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=6, lora_alpha=6, target_modules=["to_q", "to_v"]))
    paths = export_all(unet, tmp_path, formats=("kohya", "diffusers"), lora_dtype="fp16")
    with safe_open(str(tmp_path / KOHYA_FILE), framework="pt") as f:
        meta = f.metadata()
        weights = [f.get_tensor(k) for k in f.keys() if not k.endswith(".alpha")]
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_network_dim"] == "6"
    assert meta["ss_network_alpha"] == "6.0" and meta["ss_network_module"] == "networks.lora"
    assert weights and all(w.dtype == torch.float16 for w in weights)
    with safe_open(str(paths["diffusers"]), framework="pt") as f:
        meta = f.metadata()
        assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
