"""The objective interface: what the training loop (spoxl.engine.loop) calls, and nothing more.

An objective turns "data" into a scalar loss. The engine owns everything else: DeepSpeed,
precision, the optimizer, checkpoints, logging. Two shapes of objective plug in the same way:

  * offline (SFT, Diffusion-DPO, MaPO, NCP): `micro_batches` walks a dataset;
  * online (SPO): `micro_batches` samples a "round" with the current policy whenever its buffer is
    empty, then yields training micro-batches from the collected transitions. Under ZeRO-3 the
    UNet's parameters are sharded, so EVERY rank must run EVERY forward, sampling included; the
    loop guarantees every rank pulls the same number of micro-batches, and the objective must
    make each rank run the same number of UNet calls per round (sample the same count per rank).

The loop, per optimizer step, pulls `train.grad_accum` micro-batches: for each one it calls
`loss(ctx, batch)`, then `engine.backward(loss)` and `engine.step()` (DeepSpeed applies the
optimizer only on the accumulation boundary). Checkpoints are taken only on step boundaries, and
`state_dict()` must then describe exactly where the NEXT micro-batch comes from (dataset
position; for online objectives any pending buffer or the round counter plus the per-rank
generator, which the engine already saves), so that kill + resume == uninterrupted.

A method module (spoxl/methods/<name>.py) defines one Objective subclass and points to it with a
module-level `OBJECTIVE = MyObjective`; its hyper-parameters are a dataclass in `Config` (the YAML
`method:` section, validated by spoxl.config against that dataclass).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from spoxl.errors import SpoxlError

# Method name (YAML `method.name`) -> module that defines OBJECTIVE. Imported lazily so that
# loading a config does not import every method (and nothing imports triton by accident).
METHOD_MODULES = {
    "sft": "spoxl.methods.sft",
    "spo": "spoxl.methods.spo",
    "dpo": "spoxl.methods.diffusion_dpo",
    "diffusion_dpo": "spoxl.methods.diffusion_dpo",
    "mapo": "spoxl.methods.mapo",
    "ncp": "spoxl.methods.ncp",
}


def objective_class(name: str) -> type["Objective"]:
    """The Objective subclass registered for a method name (one-line error if unknown)."""
    if name not in METHOD_MODULES:
        raise SpoxlError(f"unknown method {name!r} (known: {', '.join(sorted(METHOD_MODULES))})")
    try:
        module = importlib.import_module(METHOD_MODULES[name])
    except ModuleNotFoundError as e:
        if e.name == METHOD_MODULES[name]:
            raise SpoxlError(f"method {name!r} is not implemented yet ({METHOD_MODULES[name]} missing)") from None
        raise
    cls = getattr(module, "OBJECTIVE", None)
    if cls is None:
        raise SpoxlError(f"{METHOD_MODULES[name]} defines no OBJECTIVE")
    return cls


@dataclass
class NoConfig:
    """Hyper-parameters of a method that has none."""


@dataclass
class TrainContext:
    """Everything an objective may touch during training. Built by spoxl.engine.setup.

    `policy` is the callable to run the trained UNet WITH gradients (the DeepSpeed engine: its
    forward hooks gather ZeRO-3 shards). `unet` is the underlying diffusers module (engine.module),
    e.g. for `unet.config`. Frozen parts (VAE, text encoders) live in `components`, in the compute
    dtype, never partitioned.
    """

    config: Any  # spoxl.config.Config
    components: Any  # spoxl.models.components.SDXLComponents; .unet is the policy module
    engine: Any  # deepspeed.DeepSpeedEngine around the UNet
    reference_engine: Any = None  # full fine-tuning only: a frozen copy (DeepSpeed inference engine)
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32  # compute dtype of inputs fed to the UNet
    generator: torch.Generator | None = None  # per-rank, seeded from run.seed + rank; saved in checkpoints
    logger: Any = None  # spoxl.engine.logging.MetricsLogger (rank 0 writes; every rank may call)
    global_step: int = 0  # optimizer steps done so far
    lora: bool = True
    last_checkpoint_step: int = -1  # step of the newest checkpoint saved or loaded in this run
    ema: Any = None  # spoxl.engine.ema.EMA when ema.enabled (updated by the loop, saved in checkpoints)

    # ---- model access -------------------------------------------------------------------------

    @property
    def policy(self):
        return self.engine

    @property
    def unet(self):
        return self.engine.module

    @property
    def prediction_type(self) -> str:
        configured = getattr(self.config.model, "prediction_type", None)
        return configured or self.components.scheduler.config.prediction_type

    @contextlib.contextmanager
    def reference(self):
        """Yields the frozen reference UNet (callable like the policy), without gradients.

        LoRA: the same module with its adapters disabled (no second copy in memory).
        Full fine-tuning: the frozen reference engine (sharded like the policy under ZeRO-3).
        Every rank must enter this together under ZeRO-3 (the forward gathers shards).
        """
        if self.lora:
            module = self.engine.module
            module.disable_adapters()
            try:
                with torch.no_grad():
                    yield self.engine
            finally:
                module.enable_adapters()
        else:
            if self.reference_engine is None:
                raise RuntimeError("this run has no reference model (objective.needs_reference is False)")
            with torch.no_grad():
                yield self.reference_engine

    @contextlib.contextmanager
    def sampling(self):
        """Run the policy for sampling (online objectives, sample grids): eval mode, no grad.

        Every rank must sample the same number of UNet calls under ZeRO-3.
        """
        module = self.engine.module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                yield self.engine
        finally:
            module.train(was_training)

    def unet_output(self, model, x_t, t, embeds, pooled, time_ids) -> torch.Tensor:
        """One UNet call (policy or reference) with inputs cast to the compute dtype."""
        from spoxl.sampling import unet_eps

        cast = lambda x: x.to(self.device, self.dtype)  # noqa: E731
        t = torch.as_tensor(t, device=self.device)
        return unet_eps(model, cast(x_t), t, cast(embeds), cast(pooled), cast(time_ids))

    def log(self, name: str, value, step: int | None = None) -> None:
        if self.logger is not None:
            self.logger.scalar(name, value, self.global_step if step is None else step)


class Objective:
    """Base class of every training objective. Subclasses set `name`, maybe `Config`/`needs_reference`,
    and implement `micro_batches` and `loss`."""

    name: str = "objective"
    needs_reference: bool = False
    Config: type = NoConfig

    def __init__(self, config: Any = None):
        # config: an instance of self.Config (the validated YAML `method:` section).
        self.config = config if config is not None else self.Config()

    def check(self, config: Any) -> None:
        """Cheap validation before any process group or model exists (dataset paths, columns), so
        a bad recipe fails in a second with a one-line SpoxlError. Called by `spoxl train` and
        spoxl.train; may keep what it opened for setup()."""

    def setup(self, ctx: TrainContext) -> None:
        """Called once after the engine exists (build datasets, cache embeddings, ...)."""

    def micro_batches(self, ctx: TrainContext) -> Iterator[Any]:
        """An endless (or long enough) iterator; the loop pulls ONE batch per micro-step. It may
        end (return) to end the run early, as SPO's method.epochs does; it must then end at the
        same micro-step on every rank (a function of state every rank shares).

        Called once per run, after setup() and after load_state_dict() on resume; it must start
        at the position the state dict describes. Online objectives refill by sampling here.
        """
        raise NotImplementedError

    def loss(self, ctx: TrainContext, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """(scalar loss to backward, metrics to log). Metrics are averaged over the micro-steps of
        one optimizer step and logged under `train/<key>`; keep them cheap (floats or 0-d tensors)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """Where the next micro-batch comes from (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned (called before micro_batches on resume)."""
