"""The objective interface: what the training loop (spoxl.engine.trainer.Trainer) calls, and nothing more.

An objective turns "data" into a scalar loss. The engine owns everything else: DeepSpeed,
precision, the optimizer, checkpoints, logging. Two shapes of objective plug in the same way:

  * offline (SFT, Diffusion-DPO, MaPO, NCP): `micro_batches` walks a dataset;
  * online (SPO): `micro_batches` samples a "round" with the current policy whenever its buffer is
    empty, then yields training micro-batches from the collected transitions. Under ZeRO-3 the
    UNet's parameters are sharded, so EVERY rank must run EVERY forward, sampling included; the
    loop guarantees every rank pulls the same number of micro-batches, and the objective must
    make each rank run the same number of UNet calls per round (sample the same count per rank).

The loop, per optimizer step, pulls `train.grad_accum` micro-batches: for each one it calls
`loss(view, batch)`, then `engine.backward(loss)` and `engine.step()` (DeepSpeed applies the
optimizer only on the accumulation boundary). Checkpoints are taken only on step boundaries, and
`state_dict()` must then describe exactly where the NEXT micro-batch comes from (dataset
position; for online objectives any pending buffer or the round counter plus the per-rank
generator, which the engine already saves), so that kill + resume == uninterrupted.

A method module (spoxl/methods/<name>.py) defines one Objective subclass and points to it with a
module-level `OBJECTIVE = MyObjective`, plus its line in spoxl.registry.METHOD_MODULES; its
hyper-parameters are a dataclass in `Config` (the YAML `method:` section, validated by
spoxl.config against that dataclass). An objective is built from the recipe
(`Objective.from_recipe`) and sees the run through spoxl.engine.view.RunView: the Trainer
(spoxl.engine.trainer) owns everything that changes during a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch

from spoxl.engine.view import RunView

@dataclass
class NoConfig:
    """Hyper-parameters of a method that has none."""


class Objective:
    """Base class of every training objective. Subclasses set `name`, maybe `Config`/`needs_reference`,
    and implement `micro_batches` and `loss`."""

    name: str = "objective"
    needs_reference: bool = False
    Config: type = NoConfig

    def __init__(self, config: Any = None, recipe: Any = None):
        # config: an instance of self.Config (the validated YAML `method:` section); recipe: the
        # whole spoxl.config.Config, for what the objective reads beyond its own section (data,
        # run seed, micro-batch size). The run itself is seen only through the RunView it is handed.
        self.config = config if config is not None else self.Config()
        self.recipe = recipe

    @classmethod
    def from_recipe(cls, recipe) -> "Objective":
        return cls(recipe.method.params, recipe)

    @classmethod
    def micro_step_unet_batch(cls, recipe) -> tuple[float, int | None]:
        """(UNet rows per training sample, which may be fractional, e.g. SPO's anchor on a subset of
        the micro-batch; pixel resolution or None for the model's native one) of
        the policy's forward+backward in one micro-step: what `spoxl preflight` sizes the
        activation memory by. Default: one image per sample at data.resolution."""
        return 1, recipe.data.resolution

    @classmethod
    def sampling_batch(cls, recipe) -> tuple[int, int] | None:
        """(UNet rows of one no_grad sampling forward, images decoded at once) for a method that
        samples during training (SPO); None for the rest. Sized by `spoxl preflight` too."""
        return None

    def check(self, config: Any) -> None:
        """Cheap validation before any process group or model exists (dataset paths, columns), so
        a bad recipe fails in a second with a one-line SpoxlError. Called by `spoxl train` and
        spoxl.train; may keep what it opened for setup()."""

    def setup(self, run: RunView) -> None:
        """Called once after the engine exists (build datasets, cache embeddings, ...)."""

    def micro_batches(self, run: RunView) -> Iterator[Any]:
        """An endless (or long enough) iterator; the loop pulls ONE batch per micro-step. It may
        end (return) to end the run early, as SPO's method.epochs does; it must then end at the
        same micro-step on every rank (a function of state every rank shares).

        Called once per run, after setup() and after load_state_dict() on resume; it must start
        at the position the state dict describes. Online objectives refill by sampling here.
        """
        raise NotImplementedError

    def loss(self, run: RunView, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss to backward, metrics to log). Metrics are averaged over the micro-steps of
        one optimizer step and logged under `train/<key>`; keep them cheap (floats or 0-d tensors)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Where the next micro-batch comes from (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (called before micro_batches on resume)."""
