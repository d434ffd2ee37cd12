"""SPO resumes exactly: train 4 steps == train 2, checkpoint, rebuild everything, load, train 2 more.
(The objective's state -- round counter, undealt pairs, the shared leftover -- is in the checkpoint;
each round's noise depends only on (seed, round, rank).) One rank, in process."""

import pytest
import torch

from spoxl.config import load_config
from spoxl.engine import checkpoint
from spoxl.engine.logging import MetricsLogger
from spoxl.engine.setup import build_training
from spoxl.errors import SpoxlError
from spoxl.methods.spo import SPOObjective
from spo_threads import one_thread  # noqa: F401  (autouse fixture)

FAST = ["logging.progress=false", "logging.tensorboard=false", "logging.sample_every=0", "export.at_end=false",
        "method.steps=4", "method.divert_start_step=1", "method.prompts_per_rank=2", "train.micro_batch_size=2",
        "method.preference.scale=100000", "checkpoint.keep_last=1"]  # fmt: skip


def make(out, steps):
    cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={out}", f"train.max_steps={steps}", *FAST])
    objective = SPOObjective.from_recipe(cfg)
    ctx = build_training(cfg, objective)
    ctx.logger = MetricsLogger(out, ctx.rank, tensorboard=False)
    objective.setup(ctx.view)
    return ctx, objective


def lora(ctx):
    return {n: p.detach().clone() for n, p in ctx.unet.named_parameters() if p.requires_grad}


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    ctx, obj = make(tmp_path / "a", 4)
    ctx.train()
    uninterrupted = lora(ctx)
    rounds = obj.round

    ctx, obj = make(tmp_path / "b", 2)
    ctx.train()
    assert obj.buffer is not None and len(obj.buffer) > 0, "the checkpoint must hold undealt pairs to test them"
    ctx, obj = make(tmp_path / "b", 4)  # a fresh process would build everything again
    assert checkpoint.load(ctx, obj, ctx.config.checkpoint_dir) is not None
    assert obj.round > 0 and len(obj.buffer) > 0
    ctx.train()
    assert obj.round == rounds
    resumed = lora(ctx)
    assert uninterrupted.keys() == resumed.keys()
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=0)


def test_epochs_end_the_run_after_that_many_passes_over_the_prompts(tmp_path):
    """method.epochs: 2 prompts per round over a 6-prompt set is 3 rounds an epoch; with a large
    max_steps the run ends when the prompts of 1 (then 2) epochs are sampled and their pairs
    trained, not at max_steps (the round counter the decision reads is in every checkpoint)."""
    prompts = ["a red square", "a green square", "a blue square", "a red circle", "a green circle", "a blue circle"]
    sets = [f"method.prompts={prompts}".replace("'", '"'), "train.max_steps=1000"]

    def run(out, epochs, resume_from=None):
        cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={out}", *FAST, *sets, f"method.epochs={epochs}"])
        objective = SPOObjective.from_recipe(cfg)
        ctx = build_training(cfg, objective)
        ctx.logger = MetricsLogger(out, ctx.rank, tensorboard=False)
        objective.setup(ctx.view)
        ctx.train()
        return ctx, objective

    ctx1, one = run(tmp_path / "e1", 1)
    assert one.round == 3 and 0 < ctx1.global_step < 1000
    ctx2, two = run(tmp_path / "e2", 2)
    assert two.round == 6 and ctx2.global_step > ctx1.global_step
    with pytest.raises(SpoxlError, match="method.epochs must be a positive integer"):
        SPOObjective.from_recipe(load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", "method.epochs=0"])).check(None)
