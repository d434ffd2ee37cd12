"""Run by test_engine_launcher.py under `deepspeed --num_gpus 2` (every rank runs this file).

For the ZeRO stage given on the command line, trains the tiny UNet twice in the same processes,
with LoRA and with full fine-tuning, on a fixed batch with fixed noise, and checks on every rank:
  * the loss on that batch goes down;
  * the reference (LoRA: adapters disabled; full FT: frozen copy, a ZeRO-3 engine under ZeRO-3)
    equals the untouched base UNet and never changes;
  * the LoRA export gathers real (non-empty) tensors equal to the trained ones.
Prints "CHECKS OK <stage>" on rank 0 at the end; any failed assert exits non-zero.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from inprocess import fixed_loss, fixed_unet_input, make  # noqa: E402

from spoxl.engine.zero_utils import gathered_state_dict  # noqa: E402
from spoxl.methods.sft import SFTObjective  # noqa: E402
from spoxl.models.tiny import build_tiny_sdxl  # noqa: E402


class WithReference(SFTObjective):
    needs_reference = True


def out(model, ctx, inputs):
    x, t, e, p, ids = inputs
    with torch.no_grad():
        return ctx.view.unet_output(model, x, t, e, p, ids).float()


def ds_json(stage: str, out_dir: Path) -> str:
    """The shipped config; under ZeRO-3 with persistence threshold 0, so even the tiny LoRA
    tensors are partitioned (as SDXL rank >= 64 LoRAs are) and exports must gather them."""
    import json

    ds = json.loads(Path(f"ds_configs/{stage}.json").read_text())
    if stage == "zero3":
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = out_dir / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Every rank writes the same file: write aside and rename, so no rank ever reads another
    # rank's half-written (truncated) copy (seen in CI as "not valid JSON: line 1 column 1").
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(ds))
    os.replace(tmp, path)
    return str(path)


def check(stage: str, lora: bool, out_dir: Path) -> None:
    ctx, obj = make(out_dir / ("lora" if lora else "full"),
                    [f"deepspeed.config={ds_json(stage, out_dir)}", f"lora.enabled={str(lora).lower()}",
                     "data.synthetic_size=4", "train.max_steps=4", f"train.lr={1e-2 if lora else 1e-3}"], WithReference)
    inputs = fixed_unet_input()
    base = out(build_tiny_sdxl(0).unet.eval(), ctx, inputs)
    with ctx.view.reference() as ref:
        assert torch.allclose(out(ref, ctx, inputs), base, atol=1e-5), "reference != base before training"
    before = fixed_loss(ctx, obj)
    ctx.train()
    after = fixed_loss(ctx, obj)
    assert after < before, f"{stage} lora={lora}: loss did not decrease ({before} -> {after})"
    with ctx.view.reference() as ref:
        ref_out = out(ref, ctx, inputs)
    assert torch.allclose(ref_out, base, atol=1e-5), "the reference moved during training"
    assert (out(ctx.view.policy, ctx, inputs) - base).abs().max() > 1e-4, "the policy did not move"
    if lora:
        from spoxl.engine.export import lora_state_dict

        exported = lora_state_dict(ctx.engine)  # collective; {} on ranks other than 0
        trained = gathered_state_dict(ctx.engine, keep=lambda n, t: "lora_" in n)
        assert trained and all(v.numel() > 0 for v in trained.values())
        assert any(v.abs().max() > 0 for n, v in trained.items() if "lora_B" in n), "lora_B never trained"
        if ctx.rank == 0:
            assert exported and all(v.numel() > 0 for v in exported.values()), "empty LoRA export"
            # alpha == rank in this recipe, so the export's folded scaling is 1: tensors are equal.
            assert len(exported) == len(trained)
            for name, value in trained.items():
                assert torch.equal(exported[name.replace(".default.", ".")].float(), value), name
    if ctx.rank == 0:
        print(f"{stage} lora={lora}: loss {before:.5f} -> {after:.5f}", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    stage, out_dir = args[0], Path(args[1])
    check(stage, lora=True, out_dir=out_dir)
    check(stage, lora=False, out_dir=out_dir)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"CHECKS OK {stage} world={dist.get_world_size()}", flush=True)
