"""Run by the real deepspeed launcher (2 CPU ranks) from test_zero3_launcher.py.

ZeRO-3 with stage3_param_persistence_threshold 0 partitions every LoRA tensor, so reading it
without a gather gives numel 0. This trains a LoRA on the tiny UNet for two steps with an EMA
(decay 0.5), exports every format (+ EMA), saves a DeepSpeed checkpoint in spoxl's layout, and
on rank 0 writes what the test compares against: the UNet outputs of a plain (non-DeepSpeed)
copy holding the trained weights and one holding the expected EMA weights.

    deepspeed --num_gpus 2 --master_port P tests/export/zero3_worker.py --out DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]

import torch  # noqa: E402

DECAY = 0.5
LORA_RANK, LORA_ALPHA = 4, 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    out = Path(parser.parse_args().out)

    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import save_file

    from export_helpers import LORA_TARGETS, lora_unet, unet_inputs, unet_out
    from spoxl.config import dump_yaml, load_config
    from spoxl.engine.ema import EMA
    from spoxl.engine.export import export_all
    from spoxl.models.tiny import build_tiny_sdxl

    from spoxl.engine.setup import skip_shared_memory_allreduce_op

    skip_shared_memory_allreduce_op()  # as spoxl's own init does: no leaked /dev/shm segments
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    base = build_tiny_sdxl(0).unet
    unet = lora_unet(base, r=LORA_RANK, alpha=LORA_ALPHA)  # same seed: identical on both ranks
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    params = [p for p in unet.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=unet, optimizer=torch.optim.AdamW(params, lr=5e-2), config=ds_config)
    lora_names = [n for n, p in engine.module.named_parameters() if p.requires_grad]

    # The trap is real: without a gather, a partitioned LoRA tensor reads back empty.
    raw = dict(engine.module.named_parameters())[lora_names[0]]
    assert raw.numel() == 0, f"expected a partitioned (empty) tensor, got {tuple(raw.shape)}"

    def gather_by_hand() -> dict:  # independent of spoxl.engine.zero_utils
        named = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([named[n] for n in lora_names]):
            return {n: named[n].detach().clone() for n in lora_names}

    initial = gather_by_hand()
    ema = EMA(engine, decay=DECAY)
    expected_ema = {n: t.clone() for n, t in initial.items()}
    inputs = unet_inputs(unet, batch=1, seed=rank)  # each rank its own data
    for step in (1, 2):
        loss = engine(**inputs, return_dict=False)[0].pow(2).mean()
        engine.backward(loss)
        engine.step()
        assert ema.update(engine, step)
        current = gather_by_hand()
        for n in lora_names:
            expected_ema[n] = DECAY * expected_ema[n] + (1 - DECAY) * current[n]
    trained = gather_by_hand()
    assert all(not torch.equal(trained[n], initial[n]) for n in lora_names), "training did not move the LoRA"
    for n in lora_names:  # EMA math under ZeRO-3, on every rank
        torch.testing.assert_close(ema.shadow_params()[n], expected_ema[n], rtol=0, atol=1e-7)
    sd = ema.state_dict()
    clone = EMA.from_state_dict(sd)
    assert clone.num_updates == 2 and torch.equal(clone.shadow[lora_names[0]], sd["shadow"][lora_names[0]])

    # Collective export: every rank calls it, rank 0 writes.
    export_all(engine, out / "export", formats=("diffusers", "kohya", "unet"), ema=ema)

    # A checkpoint in spoxl.engine.checkpoint's layout, for the `spoxl export` test.
    run_dir, tag = out / "run", "step_00000002"
    engine.save_checkpoint(str(run_dir / "checkpoints"), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    dist.barrier()
    if rank == 0:
        torch.save({"global_step": 2, "ema": sd}, run_dir / "checkpoints" / tag / "spoxl_rank0.pt")
        (run_dir / "checkpoints" / tag / "spoxl_complete").write_text("2")
        (run_dir / "checkpoints" / "latest_spoxl").write_text(tag)
        targets = "[" + ",".join(LORA_TARGETS) + "]"
        cfg = load_config(None, ["model.path=tiny", f"lora.rank={LORA_RANK}", f"lora.alpha={LORA_ALPHA}",
                                 f"lora.target_modules={targets}"])
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))

        # Expected outputs: plain modules (no DeepSpeed) holding the trained / EMA weights.
        eval_inputs = unet_inputs(base, batch=2, seed=7)
        expected = {}
        for label, weights in (("trained", trained), ("ema", expected_ema)):
            plain = lora_unet(base, r=LORA_RANK, alpha=LORA_ALPHA)
            plain.load_state_dict(weights, strict=False)
            expected[label] = unet_out(plain, eval_inputs)
        expected["base"] = unet_out(base, eval_inputs)
        expected["lora_A_trained"] = trained[lora_names[0]]
        save_file(expected, str(out / "expected.safetensors"))
        (out / "lora_name.txt").write_text(lora_names[0])
    dist.barrier()


if __name__ == "__main__":
    main()
