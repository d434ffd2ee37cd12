"""ZeRO-3 export + EMA on 2 CPU ranks through the real deepspeed launcher (one launch), then
`spoxl export` from the DeepSpeed checkpoint that run saved."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from export_helpers import unet_inputs, unet_out  # noqa: E402

from spoxl.engine.export import KOHYA_FILE, LORA_FILE  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ATOL = 1e-5
pytestmark = pytest.mark.launcher


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    from conftest import free_port

    out = tmp_path_factory.mktemp("zero3")
    env = dict(os.environ, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(REPO / ".venv" / "torch_extensions"))
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "tests" / "export" / "zero3_worker.py"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, load_file(str(out / "expected.safetensors"))


def _fresh_base(tiny_components):
    return copy.deepcopy(tiny_components.unet)


def _check_lora_dir(folder: Path, expected: torch.Tensor, tiny_components):
    from spoxl.models.lora import load_lora_into_unet

    eval_inputs = unet_inputs(tiny_components.unet, batch=2, seed=7)
    for name in (LORA_FILE, KOHYA_FILE):
        tensors = load_file(str(folder / name))
        assert tensors and all(t.numel() > 0 for t in tensors.values()), f"{name} has empty tensors"
        unet = _fresh_base(tiny_components)
        load_lora_into_unet(unet, folder / name)
        torch.testing.assert_close(unet_out(unet, eval_inputs), expected, atol=ATOL, rtol=1e-4)


def _check_unet_dir(folder: Path, expected: torch.Tensor, tiny_components):
    from diffusers import UNet2DConditionModel

    merged = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    eval_inputs = unet_inputs(tiny_components.unet, batch=2, seed=7)
    torch.testing.assert_close(unet_out(merged, eval_inputs), expected, atol=ATOL, rtol=1e-4)


def test_zero3_exported_lora_is_full_and_equals_trained(zero3_run, tiny_components):
    out, expected = zero3_run
    base_out = unet_out(tiny_components.unet, unet_inputs(tiny_components.unet, batch=2, seed=7))
    torch.testing.assert_close(base_out, expected["base"])  # the worker's base == the tiny UNet
    assert (expected["trained"] - base_out).abs().max() > 1e-2  # the LoRA matters
    # the trained lora_A tensor itself, bit for bit (A carries no scaling)
    name = (out / "lora_name.txt").read_text().replace(".default.", ".")
    stored = load_file(str(out / "export" / LORA_FILE))[f"unet.{name}"]
    torch.testing.assert_close(stored, expected["lora_A_trained"], rtol=0, atol=0)
    _check_lora_dir(out / "export", expected["trained"], tiny_components)
    _check_unet_dir(out / "export", expected["trained"], tiny_components)


def test_zero3_ema_exported_beside_the_weights(zero3_run, tiny_components):
    out, expected = zero3_run
    assert not torch.allclose(expected["ema"], expected["trained"], atol=1e-4)  # EMA lags the weights
    _check_lora_dir(out / "export" / "ema", expected["ema"], tiny_components)
    _check_unet_dir(out / "export" / "ema", expected["ema"], tiny_components)


def test_spoxl_export_from_zero3_checkpoint(zero3_run, tiny_components, tmp_path, capsys):
    from spoxl.cli import main

    out, expected = zero3_run
    assert main(["export", "--checkpoint", str(out / "run"), "--out", str(tmp_path / "x"),
                 "--format", "diffusers", "--format", "kohya", "--format", "unet"]) == 0
    assert "ema/diffusers" in capsys.readouterr().out
    _check_lora_dir(tmp_path / "x", expected["trained"], tiny_components)
    _check_unet_dir(tmp_path / "x", expected["trained"], tiny_components)
    _check_lora_dir(tmp_path / "x" / "ema", expected["ema"], tiny_components)
    # a tag folder works too, and --no-ema skips the EMA
    tag_dir = out / "run" / "checkpoints" / "step_00000002"
    assert main(["export", "--checkpoint", str(tag_dir), "--out", str(tmp_path / "y"), "--no-ema"]) == 0
    assert (tmp_path / "y" / LORA_FILE).is_file() and not (tmp_path / "y" / "ema").exists()


def test_spoxl_export_errors(zero3_run, tmp_path, capsys):
    from spoxl.cli import main

    out, _ = zero3_run
    cases = [
        (["--checkpoint", str(tmp_path / "missing")], "does not exist"),
        (["--checkpoint", str(tmp_path)], "no complete checkpoint"),
        (["--checkpoint", str(out / "run"), "--config", str(tmp_path / "none.yaml")], "none.yaml"),
    ]
    bad_cfg = tmp_path / "wrong.yaml"
    bad_cfg.write_text("model:\n  path: tiny\nlora:\n  rank: 4\n  target_modules: [to_q]\n")
    cases.append((["--checkpoint", str(out / "run"), "--config", str(bad_cfg)], "does not match the run's model"))
    for extra, words in cases:
        assert main(["export", "--out", str(tmp_path / "o"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after DeepSpeed's progress bars
        assert err.startswith("spoxl export: error:") and "\n" not in err and words in err, err
