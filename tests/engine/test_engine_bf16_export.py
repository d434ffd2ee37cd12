"""bf16 training keeps the module in bf16 and the trained weights in DeepSpeed's fp32 master copy:
the live export and the EMA must read the latter (single in-process rank, ZeRO-2 and ZeRO-3)."""

import pytest
import torch
from safetensors.torch import load_file

from inprocess import make
from spoxl.engine import checkpoint


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_bf16_live_export_and_ema_read_the_fp32_master_weights(stage, tmp_path):
    from deepspeed.utils import safe_get_full_fp32_param

    from spoxl.config import dump_yaml
    from spoxl.engine.ema import EMA
    from spoxl.engine.export import KOHYA_FILE, LORA_FILE, export_all, export_checkpoint
    from spoxl.engine.zero_utils import gathered_state_dict

    run = tmp_path / "run"
    ctx, obj = make(run, ["deepspeed.precision=bf16", "lora.enabled=true", "train.max_steps=2", "train.lr=1e-2",
                          f"deepspeed.config={stage}"])
    ctx.train()
    trainable = {n: p for n, p in ctx.unet.named_parameters() if p.requires_grad}
    master = {n: safe_get_full_fp32_param(p).float().cpu() for n, p in trainable.items()}
    assert all(p.dtype == torch.bfloat16 for p in trainable.values())
    # The test means something only if bf16 rounding lost bits of what was trained.
    with_bf16 = gathered_state_dict(ctx.unet, keep=lambda n, t: n in master)  # the plain module: bf16 values
    assert any(not torch.equal(with_bf16[n], master[n]) for n in master)

    read = gathered_state_dict(ctx.engine, keep=lambda n, t: n in master)
    for n in master:
        assert torch.equal(read[n], master[n]), n
    ema = EMA(ctx.engine, decay=0.5)
    for n in master:
        assert torch.equal(ema.shadow[n], master[n]), n

    # The live export equals `spoxl export` from the checkpoint of the same step (fp32 there).
    live = export_all(ctx.engine, tmp_path / "live", formats=("diffusers", "kohya"))
    checkpoint.save(ctx, obj, ctx.config.checkpoint_dir, keep_last=1)
    (run / "config.yaml").write_text(dump_yaml(ctx.config))
    offline = export_checkpoint(run, tmp_path / "offline")
    for fmt, name in (("diffusers", LORA_FILE), ("kohya", KOHYA_FILE)):
        a, b = load_file(live[fmt]), load_file(offline[fmt])
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
