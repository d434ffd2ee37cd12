"""model.vae_path (a diffusers VAE folder replacing the model's, e.g. the fp16-fix SDXL VAE) and
model.vae_dtype (the frozen VAE stays fp32 by default in bf16/fp16 runs)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from inprocess import make  # noqa: E402

from spoxl.errors import SpoxlError  # noqa: E402
from spoxl.models.loading import load_sdxl  # noqa: E402
from spoxl.models.tiny import build_tiny_sdxl  # noqa: E402


def test_vae_path_replaces_the_vae(tmp_path):
    other = build_tiny_sdxl(7).vae
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    other.save_pretrained(tmp_path / "fp16_fix_vae")
    comps = load_sdxl("tiny", vae_path=tmp_path / "fp16_fix_vae")
    for (name, a), b in zip(comps.vae.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(next(load_sdxl("tiny").vae.parameters()), next(comps.vae.parameters()))
    with pytest.raises(SpoxlError, match="has no config.json"):
        load_sdxl("tiny", vae_path=tmp_path / "nowhere")
    with pytest.raises(SpoxlError, match="not both"):
        load_sdxl("tiny", vae_path=tmp_path / "fp16_fix_vae", vae_file=tmp_path / "vae.safetensors")


@pytest.mark.parametrize("vae_dtype, expected", [("fp32", torch.float32), ("compute", torch.bfloat16)])
def test_vae_dtype_in_a_bf16_run(tmp_path, vae_dtype, expected):
    ctx, _ = make(tmp_path, ["deepspeed.precision=bf16", f"model.vae_dtype={vae_dtype}"])
    assert next(ctx.components.vae.parameters()).dtype == expected
    assert next(ctx.components.text_encoder.parameters()).dtype == torch.bfloat16  # the encoders follow the run
