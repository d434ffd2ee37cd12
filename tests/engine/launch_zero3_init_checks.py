"""Run by test_engine_launcher.py under `deepspeed --num_gpus 2` (every rank runs this file).

ZeRO-3 builds the UNet partitioned from construction and loads a diffusers folder's weights into
the partitions (spoxl.engine.sharded), and the trainer uses that path. Checked on every rank:
  * right after the build every UNet parameter is a ZeRO-3 partition: no data outside a gather,
    this rank's shard at most ceil(numel / 2) elements, so the rank holds about half the model;
  * loading gathered one module's parameters at a time (never the model), rank 0 copied every
    tensor, and the gathered values are exactly the folder's (read here independently);
  * build_training (LoRA, and full fine-tuning with its frozen reference) never loads a whole UNet
    (UNet2DConditionModel.from_pretrained is made to fail) and hands out partitioned UNets whose
    gathered weights are the folder's;
  * a single-file UNet in the original LDM layout (A1111 / ComfyUI; written by the test from other
    weights) loads into the partitions the same way, directly and through model.unet_file, with
    neither from_pretrained nor from_single_file ever building a whole UNet.
Prints "ZERO3 INIT OK world=2" on rank 0 at the end; any failed assert exits non-zero.
"""

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from inprocess import FAST  # noqa: E402
from launch_train_checks import ds_json  # noqa: E402

from spoxl.config import load_config  # noqa: E402
from spoxl.engine.ds_config import build_ds_config  # noqa: E402
from spoxl.engine.setup import build_training, init_distributed  # noqa: E402
from spoxl.engine.sharded import build_sharded_unet  # noqa: E402
from spoxl.registry import build_objective  # noqa: E402


def folder_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def assert_partitioned(unet, world: int) -> None:
    held = total = 0
    for name, p in unet.named_parameters():
        assert hasattr(p, "ds_id"), f"{name} is not a ZeRO-3 parameter"
        assert p.data.numel() == 0, f"{name} holds its full data outside a gather"
        assert p.ds_tensor.numel() <= math.ceil(p.ds_numel / world), f"{name}: shard larger than 1/{world}"
        held += p.ds_tensor.numel()
        total += p.ds_numel
    assert held <= total / world + 2 * world * len(list(unet.parameters())), (held, total)


def assert_equals_folder(unet, expected: dict, what: str) -> None:
    import deepspeed

    params = dict(unet.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        for name, value in expected.items():
            key = name if name in params else f"{name.rsplit('.', 1)[0]}.base_layer.{name.rsplit('.', 1)[1]}"
            assert torch.equal(params[key].data.float(), value.float()), f"{what}: {name} differs from the folder"


def main(folder: Path, out: Path, ldm_file: Path) -> None:
    cfg = load_config(None, [f"run.output_dir={out / 'lora'}", *FAST, f"model.path={folder}",
                             f"deepspeed.config={ds_json('zero3', out)}"])  # fmt: skip
    rank, world, _ = init_distributed(cfg)
    assert world == 2
    ds = build_ds_config(cfg, world, on_cpu=True)
    expected = folder_weights(folder)

    config = json.loads((folder / "unet" / "config.json").read_text())
    unet, stats = build_sharded_unet(config, ds, weights=folder / "unet")
    assert_partitioned(unet, world)
    largest = max(sum(p.ds_numel for p in m.parameters(recurse=False)) for m in unet.modules())
    total = sum(p.ds_numel for p in unet.parameters())
    assert stats.max_gathered == largest < total / 4, (stats, largest, total)  # one module at a time
    assert stats.tensors == (len(expected) if rank == 0 else 0), stats
    assert_equals_folder(unet, expected, "build_sharded_unet")

    # The trainer must take the partitioned path: a full UNet load on a rank fails this script.
    from diffusers import UNet2DConditionModel

    def full_load(*args, **kwargs):
        raise AssertionError("a rank loaded the whole UNet (UNet2DConditionModel.from_pretrained) under ZeRO-3")

    UNet2DConditionModel.from_pretrained = full_load
    UNet2DConditionModel.from_single_file = full_load
    for lora in (True, False):
        cfg = load_config(None, [f"run.output_dir={out / str(lora)}", *FAST, f"model.path={folder}",
                                 f"deepspeed.config={ds_json('zero3', out)}", f"lora.enabled={str(lora).lower()}"])  # fmt: skip
        objective = build_objective(cfg)
        objective.needs_reference = True
        trainer = build_training(cfg, objective)
        assert_partitioned(trainer.unet, world)
        assert_equals_folder(trainer.unet, expected, f"the trainer's UNet (lora={lora})")
        if not lora:
            reference = trainer.reference_engine.module
            assert reference is not trainer.unet
            assert_partitioned(reference, world)
            assert_equals_folder(reference, expected, "the frozen reference")

    # A single-file LDM checkpoint of OTHER weights: built directly, and as the recipe's unet_file.
    from safetensors.torch import load_file

    other = load_file(str(ldm_file.with_suffix(".expected.safetensors")))
    unet, stats = build_sharded_unet(config, ds, weights=ldm_file)
    assert_partitioned(unet, world)
    assert stats.max_gathered == largest, stats
    assert_equals_folder(unet, other, "build_sharded_unet(single LDM file)")
    cfg = load_config(None, [f"run.output_dir={out / 'single'}", *FAST, f"model.path={folder}",
                             f"model.unet_file={ldm_file}", f"deepspeed.config={ds_json('zero3', out)}"])  # fmt: skip
    trainer = build_training(cfg, build_objective(cfg))
    assert_partitioned(trainer.unet, world)
    assert_equals_folder(trainer.unet, other, "the trainer's UNet from model.unet_file")
    if rank == 0:
        print(f"ZERO3 INIT OK world={world}", flush=True)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(Path(args[0]), Path(args[1]), Path(args[2]))
