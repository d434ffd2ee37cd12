"""SD1.5-architecture models (one text encoder, no added conditioning), issue 11 item 4: a diffusers
SD1.5 folder loads through the same loader as SDXL, prompts encode as StableDiffusionPipeline
encodes them, the UNet is called without SDXL's text_time conditioning, the offline objectives
run on it, and its LoRA exports in the names sd-scripts uses for SD1.x."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from inprocess import make  # noqa: E402

from spoxl import sampling  # noqa: E402
from spoxl.errors import SpoxlError  # noqa: E402
from spoxl.models.loading import load_sdxl  # noqa: E402
from spoxl.models.text import encode_with_negative, make_time_ids  # noqa: E402
from spoxl.models.tiny import build_tiny_sd15  # noqa: E402

PROMPTS = ["a red circle", "two small green squares"]


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sd15")
    build_tiny_sd15(3).save_pretrained(path)
    return path


def test_a_diffusers_sd15_folder_loads_as_sd15(sd15_dir):
    parts = load_sdxl(sd15_dir)
    assert parts.architecture == "sd15" and parts.text_encoder_2 is None and parts.tokenizer_2 is None
    assert parts.force_zeros_for_empty_prompt is False  # SD1.5's negative is the encoded ""
    assert parts.vae.config.scaling_factor == pytest.approx(0.18215)
    assert parts.unet.config.addition_embed_type is None
    fresh = build_tiny_sd15(3)
    for name, p in fresh.unet.state_dict().items():  # the saved weights, not a fresh random init
        assert torch.equal(parts.unet.state_dict()[name], p), name
    assert load_sdxl("tiny").architecture == "sdxl"


def test_sd15_embeds_and_negatives_are_stable_diffusion_pipelines(sd15_dir):
    from diffusers import StableDiffusionPipeline

    parts = load_sdxl(sd15_dir)
    pos, neg = encode_with_negative(parts, PROMPTS)
    pipe = StableDiffusionPipeline.from_pretrained(sd15_dir, local_files_only=True, safety_checker=None)
    pipe_pos, pipe_neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, None)
    torch.testing.assert_close(pos.embeds, pipe_pos, rtol=0, atol=0)
    torch.testing.assert_close(neg.embeds, pipe_neg, rtol=0, atol=0)  # the encoded "", not zeros
    assert neg.embeds.abs().sum() > 0
    assert pos.pooled.shape == (2, 0)  # no pooled input to an SD1.5 UNet


def test_sd15_unet_is_called_without_added_conditioning(sd15_dir):
    """spoxl's CFG output equals the SD1.5 pipeline's denoiser call written out by hand."""
    parts = load_sdxl(sd15_dir)
    pos, neg = encode_with_negative(parts, PROMPTS)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    got = sampling.guided_output(parts.unet, x, 400, pos, neg, make_time_ids(2, (64, 64)), 7.5)
    with torch.no_grad():
        t = torch.tensor([400, 400])
        uncond = parts.unet(x, t, encoder_hidden_states=neg.embeds).sample
        cond = parts.unet(x, t, encoder_hidden_states=pos.embeds).sample
    # fp32; the batched call may take other SIMD paths than two single calls (4.7e-6 seen on one CPU)
    torch.testing.assert_close(got, uncond + 7.5 * (cond - uncond), rtol=1e-5, atol=2e-5)
    assert sampling.added_conditioning(pos.pooled, make_time_ids(2, (64, 64))) is None
    sdxl_pooled = torch.zeros(2, 32)
    assert set(sampling.added_conditioning(sdxl_pooled, make_time_ids(2, (64, 64)))) == {"text_embeds", "time_ids"}


def test_an_sd15_folder_missing_a_part_is_a_one_line_error(sd15_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd15_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(SpoxlError, match="no text_encoder/ subfolder"):
        load_sdxl(broken)


def test_dpo_runs_on_sd15_and_its_reference_is_the_base(tmp_path):
    """Diffusion-DPO in-process on the tiny SD1.5: LoRA zero at init, so the loss is exactly log 2
    on a real pair (the MSEs differ between w and l): prompts encode, the UNet runs, the loss runs."""
    from spoxl.methods.diffusion_dpo import DiffusionDPOObjective

    ctx, obj = make(tmp_path, ["model.path=tiny-sd15", "method.name=dpo", "train.max_steps=1"], DiffusionDPOObjective)
    assert ctx.components.architecture == "sd15"
    batch = next(iter(obj.micro_batches(ctx.view)))
    with torch.no_grad():
        loss, metrics = obj.loss(ctx.view, batch)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
    assert float(metrics["mse_w"]) != float(metrics["mse_l"])


def test_sd15_lora_exports_in_sd_scripts_sd1_names(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
    from export_helpers import lora_unet
    from safetensors import safe_open

    from spoxl.engine.export import KOHYA_FILE, LORA_FILE, export_lora

    parts = build_tiny_sd15(0)
    unet = lora_unet(parts.unet)
    export_lora(unet, tmp_path, formats=("diffusers", "kohya"))
    with safe_open(str(tmp_path / KOHYA_FILE), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert not any("input_blocks" in k for k in keys)  # SGM names are SDXL's only
    assert meta["ss_base_model_version"] == "sd_v1"

    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "base"
    parts.save_pretrained(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.load_lora_weights(str(tmp_path), weight_name=LORA_FILE)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    e = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 300, encoder_hidden_states=e).sample,
                                   unet(x, 300, encoder_hidden_states=e).sample, atol=1e-5, rtol=1e-4)  # fmt: skip


def test_make_tiny_writes_an_sd15_folder(tmp_path):
    out = tmp_path / "m"
    subprocess.run([sys.executable, "-m", "spoxl.cli", "make-tiny", str(out), "--arch", "sd15"], check=True,
                   capture_output=True)  # fmt: skip
    assert not (out / "text_encoder_2").exists()
    assert '"StableDiffusionPipeline"' in (out / "model_index.json").read_text()
    assert load_sdxl(out).architecture == "sd15"
