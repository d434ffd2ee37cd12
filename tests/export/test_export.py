"""LoRA / UNet export on a plain module: every exported format reproduces the trained UNet."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from export_helpers import lora_unet, unet_inputs, unet_out  # noqa: E402

from spoxl.engine.export import KOHYA_FILE, LORA_FILE, export_all, export_lora, export_unet  # noqa: E402
from spoxl.errors import SpoxlError  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def trained(tiny_components):
    unet = lora_unet(tiny_components.unet)
    inputs = unet_inputs(unet)
    return unet, inputs, unet_out(unet, inputs)


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    unet, _, _ = trained
    out = tmp_path_factory.mktemp("export")
    paths = export_all(unet, out, formats=("diffusers", "kohya", "unet"))
    return out, paths


def test_lora_changes_the_output(trained, tiny_components):
    # Guards the other tests: if the LoRA were a no-op, "same output" would prove nothing.
    unet, inputs, out = trained
    base = unet_out(tiny_components.unet, inputs)
    assert (out - base).abs().max() > 1e-2


def test_export_writes_every_format(exported):
    out, paths = exported
    assert paths["diffusers"] == out / LORA_FILE and paths["diffusers"].is_file()
    assert paths["kohya"] == out / KOHYA_FILE and paths["kohya"].is_file()
    assert (out / "unet" / "config.json").is_file()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    kohya = load_file(str(paths["kohya"]))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert any(k.endswith(".alpha") for k in kohya) and any("lora_up" in k for k in kohya)
    diffusers_sd = load_file(str(paths["diffusers"]))
    assert all(k.startswith("unet.") and v.numel() > 0 for k, v in diffusers_sd.items())


def test_diffusers_lora_loads_into_sdxl_pipeline(exported, trained, tiny_dir):
    from diffusers import StableDiffusionXLPipeline

    out, _ = exported
    unet, inputs, expected = trained
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.load_lora_weights(str(out), weight_name=LORA_FILE)
    torch.testing.assert_close(unet_out(pipe.unet, inputs), expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_lora_loads_through_spoxl_sample_loader(fmt, exported, trained, tiny_dir):
    from diffusers import UNet2DConditionModel

    from spoxl.models.lora import load_lora_into_unet

    _, paths = exported
    _, inputs, expected = trained
    fresh = UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet", local_files_only=True)
    load_lora_into_unet(fresh, paths[fmt])
    torch.testing.assert_close(unet_out(fresh, inputs), expected, atol=ATOL, rtol=1e-4)


def test_merged_unet_folder_matches(exported, trained):
    from diffusers import UNet2DConditionModel

    out, _ = exported
    _, inputs, expected = trained
    merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet", local_files_only=True)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(unet_out(merged, inputs), expected, atol=ATOL, rtol=1e-4)


def test_full_finetune_unet_export(tiny_components, tmp_path):
    import copy

    from diffusers import UNet2DConditionModel

    unet = copy.deepcopy(tiny_components.unet)
    with torch.no_grad():
        unet.conv_in.weight.add_(0.1)
    inputs = unet_inputs(unet)
    export_unet(unet, tmp_path)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet", local_files_only=True)
    torch.testing.assert_close(unet_out(loaded, inputs), unet_out(unet, inputs), atol=ATOL, rtol=1e-4)
    with pytest.raises(SpoxlError, match="needs a LoRA run"):
        export_all(unet, tmp_path, formats=("kohya",))


def test_overrides_replace_weights(trained, tmp_path):
    # EMA export goes through overrides: zeroing lora_B must give back the base UNet's output.
    unet, inputs, _ = trained
    zero_b = {n: torch.zeros_like(p) for n, p in unet.named_parameters() if "lora_B" in n}
    paths = export_lora(unet, tmp_path, formats=("diffusers",), overrides=zero_b)
    sd = load_file(str(paths["diffusers"]))
    ups = [v for k, v in sd.items() if "lora_B" in k or "lora.up" in k]
    assert ups and all(torch.count_nonzero(v) == 0 for v in ups)
    with pytest.raises(SpoxlError, match="does not have"):
        export_lora(unet, tmp_path, overrides={"nope.weight": torch.zeros(1)})


def test_unknown_format_is_one_line_error(trained, tmp_path):
    unet, _, _ = trained
    with pytest.raises(SpoxlError, match="unknown export format 'ckpt'"):
        export_all(unet, tmp_path, formats=("ckpt",))


def test_sample_cli_with_exported_lora(exported, tmp_path):
    from spoxl.cli import main

    _, paths = exported
    for fmt in ("diffusers", "kohya"):
        png = tmp_path / f"{fmt}.png"
        args = ["sample", "--lora", str(paths[fmt]), "--steps", "1", "--prompt", "a red circle", "--out", str(png)]
        assert main(args) == 0 and png.is_file()


def test_an_export_that_dies_mid_write_leaves_the_previous_one_intact(trained, tmp_path, monkeypatch):
    # A first export, then a second whose writing fails half-way (a full disk, or a kill: the
    # staging files are never renamed into place): the first export's files stay whole and equal.
    import spoxl.engine.export as export_module

    unet, _, _ = trained
    first = export_all(unet, tmp_path, formats=("diffusers", "kohya", "unet"))
    before = {name: p.read_bytes() if p.is_file() else (p / "diffusion_pytorch_model.safetensors").read_bytes()
              for name, p in first.items()}
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def dies_half_way(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the file is cut short where it is being written...
            f.truncate(100)
        raise OSError(28, "No space left on device", filename)  # ...and the writer fails

    monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
    with torch.no_grad():
        next(p for n, p in unet.named_parameters() if "lora_B" in n).add_(1.0)  # the new export would differ
    for fmt in ("kohya", "diffusers", "unet"):
        with pytest.raises(SpoxlError, match="No space left on device"):
            export_all(unet, tmp_path, formats=(fmt,))
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    with torch.no_grad():
        next(p for n, p in unet.named_parameters() if "lora_B" in n).sub_(1.0)
    after = {name: p.read_bytes() if p.is_file() else (p / "diffusion_pytorch_model.safetensors").read_bytes()
             for name, p in first.items()}
    assert after == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".staging")]  # no leftovers
    assert export_module.KOHYA_FILE in {p.name for p in tmp_path.iterdir()}
