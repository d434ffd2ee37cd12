"""Full fine-tuning under ZeRO-2 (one in-process CPU rank): export from the live engine and
`spoxl export` from its checkpoint both give the trained UNet."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from export_helpers import unet_inputs, unet_out  # noqa: E402


def test_zero2_full_finetune_export_and_checkpoint(tiny_components, tmp_path):
    import deepspeed
    from diffusers import UNet2DConditionModel

    from spoxl.cli import main
    from spoxl.config import dump_yaml, load_config
    from spoxl.engine.ema import EMA
    from spoxl.engine.export import export_all
    from spoxl.engine.setup import init_distributed

    cfg = load_config(None, ["model.path=tiny", "lora.enabled=false"])
    init_distributed(cfg)
    unet = copy.deepcopy(tiny_components.unet).requires_grad_(True)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
          "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 2}}
    engine, *_ = deepspeed.initialize(model=unet, optimizer=torch.optim.AdamW(unet.parameters(), lr=1e-2), config=ds)
    ema = EMA(engine, decay=0.9)
    inputs = unet_inputs(unet, batch=1, seed=3)
    loss = engine(**inputs, return_dict=False)[0].pow(2).mean()
    engine.backward(loss)
    engine.step()
    ema.update(engine, 1)

    eval_inputs = unet_inputs(unet, batch=2, seed=7)
    expected = unet_out(engine.module, eval_inputs)
    assert (expected - unet_out(tiny_components.unet, eval_inputs)).abs().max() > 1e-3  # it trained

    paths = export_all(engine, tmp_path / "live", formats=("unet",), ema=ema)
    assert set(paths) == {"unet", "ema/unet"}
    live = UNet2DConditionModel.from_pretrained(tmp_path / "live", subfolder="unet", local_files_only=True)
    torch.testing.assert_close(unet_out(live, eval_inputs), expected, atol=1e-5, rtol=1e-4)
    ema_unet = UNet2DConditionModel.from_pretrained(tmp_path / "live" / "ema", subfolder="unet", local_files_only=True)
    for name, p in ema_unet.named_parameters():
        torch.testing.assert_close(p, ema.shadow[name], rtol=0, atol=0)

    run = tmp_path / "run"
    engine.save_checkpoint(str(run / "checkpoints"), tag="step_00000001", save_latest=False)
    (run / "checkpoints" / "step_00000001" / "spoxl_complete").write_text("1")
    (run / "checkpoints" / "latest_spoxl").write_text("step_00000001")
    (run / "config.yaml").write_text(dump_yaml(cfg))
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "offline")]) == 0
    offline = UNet2DConditionModel.from_pretrained(tmp_path / "offline", subfolder="unet", local_files_only=True)
    torch.testing.assert_close(unet_out(offline, eval_inputs), expected, atol=1e-5, rtol=1e-4)
