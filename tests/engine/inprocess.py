"""Helpers for single-rank, in-process engine tests (DeepSpeed on the CPU accelerator, gloo)."""

import torch

from spoxl.config import load_config
from spoxl.engine.logging import MetricsLogger
from spoxl.engine.setup import build_training
from spoxl.methods.sft import SFTObjective

FAST = [
    "logging.progress=false", "logging.tensorboard=false", "checkpoint.save_final=false",
    "export.at_end=false", "data.shuffle=false", "method.fixed_noise=true", "data.synthetic_size=2",
    "train.micro_batch_size=2", "train.warmup_steps=0", "train.lr_schedule=constant",
]


def make(tmp_path, overrides=(), objective_cls=SFTObjective):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", *FAST, *overrides])
    objective = objective_cls.from_recipe(cfg)
    ctx = build_training(cfg, objective)
    ctx.logger = MetricsLogger(tmp_path, ctx.rank, tensorboard=False)
    objective.setup(ctx.view)
    return ctx, objective


def fixed_unet_input(seed=123, batch=2):
    """A fixed (x_t, t, embeds, pooled, time_ids) for the tiny UNet."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([500, 20][:batch]),
            torch.randn(batch, 77, 64, generator=g), torch.randn(batch, 32, generator=g),
            torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch))


def trainable(ctx) -> dict:
    return {n: p.detach().clone() for n, p in ctx.unet.named_parameters() if p.requires_grad}


def fixed_loss(ctx, objective) -> float:
    """The SFT loss on the dataset's first micro-batch, without training and without moving the
    data position (fixed_noise makes it deterministic)."""
    position = objective.state_dict()
    objective.load_state_dict({"epoch": 0, "index": 0})
    batch = next(iter(objective.micro_batches(ctx.view)))
    objective.load_state_dict(position)
    with torch.no_grad():
        return float(objective.loss(ctx.view, batch)[0])
