"""LPO on the toy world through the engine, in process (one rank): configs/toy_lpo.yaml with the
shipped toy LRM trains, every pair comes from a pool scored as latents (no VAE anywhere in the
sampling), and the LoRA moves.

What it does NOT show: that LPO raises held-out fidelity on the toy world. Measured, it does not
(docs/lpo.md: the toy LRM ranks the candidates of one x_t no better than chance, so LPO's pairs are
near-random labels); the row in benchmarks/alignment.py's table is the evidence.
"""

import sys
from pathlib import Path

import torch

from spoxl.config import load_config
from spoxl.engine.logging import MetricsLogger
from spoxl.engine.setup import build_training
from spoxl.methods.lpo import LPOObjective
from spoxl.models.lrm import LatentRewardModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spo"))
from spo_threads import one_thread  # noqa: F401,E402  (autouse fixture: one intra-op thread)

SHORT = ["logging.progress=false", "logging.tensorboard=false", "logging.sample_every=0", "export.at_end=false",
         "checkpoint.save_final=false", "train.max_steps=3", "method.prompts_per_rank=2", "train.micro_batch_size=4"]


class NoVAE:
    def __getattr__(self, name):
        raise AssertionError(f"LPO's sampling touched the VAE ({name})")


def test_toy_lpo_recipe_trains_with_the_shipped_lrm_and_never_decodes(tmp_path):
    cfg = load_config("configs/toy_lpo.yaml", [f"run.output_dir={tmp_path}", *SHORT])
    objective = LPOObjective.from_recipe(cfg)
    ctx = build_training(cfg, objective)
    ctx.logger = MetricsLogger(tmp_path, ctx.rank, tensorboard=False)
    objective.setup(ctx.view)
    assert isinstance(objective.scorer, LatentRewardModel) and not objective.scorer.training
    objective.sampler.vae = NoVAE()
    lora = {k: v.detach().clone() for k, v in ctx.unet.named_parameters() if "lora" in k}
    ctx.train()
    rollout = objective.rollout
    assert rollout.round >= 1
    moved = [k for k, v in ctx.unet.named_parameters() if "lora" in k and not torch.equal(v.detach(), lora[k])]
    assert moved, "three LPO steps left every LoRA weight where it was"
