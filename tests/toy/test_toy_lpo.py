"""LPO on the toy world, in process (one rank): a short run with the shipped toy LRM raises
held-out prompt fidelity, and the same run with the LRM's scores negated lowers it. A preference
inverted anywhere between the LRM and the loss (pair selection, w/l bookkeeping, the log-ratio
sign) swaps the two runs and fails both assertions.

Held-out: captions whose (colour, shape, position) combination never appeared in pretraining, in
LPO's prompts or in the LRM's training pairs, on seeds no sampling round drew.
"""

import sys
from pathlib import Path

import pytest
import torch

from spoxl.config import load_config
from spoxl.engine.logging import MetricsLogger
from spoxl.engine.setup import build_training
from spoxl.evaluation import paired_stats, score_images
from spoxl.imaging import sample_images
from spoxl.methods.lpo import LPOObjective
from spoxl.toy import world
from spoxl.toy.scorers import ToyScorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spo"))
from spo_threads import one_thread  # noqa: F401,E402  (autouse fixture: one intra-op thread)

# configs/toy_lpo.yaml shortened (measured margins in docs/lpo.md)
SHORT = ["logging.progress=false", "logging.tensorboard=false", "logging.sample_every=0", "export.at_end=false",
         "checkpoint.save_final=false", "train.max_steps=30", "method.prompts_per_rank=4",
         "train.micro_batch_size=16"]  # fmt: skip
EVAL_PROMPTS = world.held_out_captions(36, seed=1)
EVAL_SEEDS = 2


class Negated:
    """The LRM with its scores negated: the preference inverted at its source."""

    input = "latents"

    def __init__(self, model):
        self.model = model

    def score(self, x, prompts, timesteps):
        return -self.model.score(x, prompts, timesteps)


def train_and_eval(out, inverted: bool):
    cfg = load_config("configs/toy_lpo.yaml", [f"run.output_dir={out}", *SHORT])
    objective = LPOObjective.from_recipe(cfg)
    ctx = build_training(cfg, objective)
    ctx.logger = MetricsLogger(out, ctx.rank, tensorboard=False)
    objective.setup(ctx.view)
    if inverted:
        objective.sampler.scorer = Negated(objective.sampler.scorer)
    ctx.train()
    comps, unet = ctx.components, ctx.unet
    comps.unet = unet
    batch = [p for p in EVAL_PROMPTS for _ in range(EVAL_SEEDS)]
    scores = {}
    for name in ("base", "tuned"):
        (unet.disable_adapters if name == "base" else unet.enable_adapters)()
        with torch.no_grad():
            images = sample_images(comps, batch, steps=20, cfg_scale=5.0, eta=0.0, seed=100_000, batch_size=len(batch))
        scores[name] = score_images(ToyScorer("fidelity"), images, batch)[0]
    return paired_stats(scores["base"], scores["tuned"])


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    return train_and_eval(tmp_path_factory.mktemp("lpo_up"), inverted=False)


@pytest.fixture(scope="module")
def inverted(tmp_path_factory):
    return train_and_eval(tmp_path_factory.mktemp("lpo_down"), inverted=True)


def test_lpo_with_the_toy_lrm_raises_held_out_fidelity(aligned):
    assert aligned["diff_mean"] > 2 * aligned["diff_stderr"], aligned
    assert aligned["win_rate"] > 0.5, aligned


def test_lpo_with_the_lrm_negated_lowers_it(aligned, inverted):
    assert inverted["diff_mean"] < -2 * inverted["diff_stderr"], inverted
    assert aligned["mean"] > inverted["mean"] + 3, (aligned, inverted)
