"""What an objective sees of a run: a narrow, read-only view of the Trainer (spoxl.engine.trainer).

Objectives turn batches into losses; they may run the policy and the reference, sample, log, and
read where the run is, but never change the run's state (step counter, engine, EMA, logger,
checkpoints: the Trainer's). What they need from the recipe they were given when they were built
(spoxl.methods.base.Objective(params, recipe)), not through this view.

  policy / unet           the trained UNet: the DeepSpeed engine (call it: ZeRO-3 hooks gather
                          shards) / the diffusers module under it (for .config)
  reference()             context manager yielding the frozen reference (LoRA: adapters off;
                          full fine-tuning: the frozen copy), no grad
  sampling()              context manager yielding the policy in eval mode, no grad
  unet_output(...)        one UNet call with inputs cast to the compute dtype
  components              the frozen parts (VAE, text encoders, tokenizers, scheduler)
  device, dtype, rank, world_size, prediction_type, zero_stage, generator (the per-rank, checkpointed stream),
  global_step (read-only), log(name, value), info(message)
"""

from __future__ import annotations

import contextlib

import torch


class RunView:
    def __init__(self, trainer):
        self._trainer = trainer

    # ---- what the run is -------------------------------------------------------------------

    @property
    def components(self):
        return self._trainer.components

    @property
    def device(self) -> torch.device:
        return self._trainer.device

    @property
    def dtype(self) -> torch.dtype:
        return self._trainer.dtype

    @property
    def rank(self) -> int:
        return self._trainer.rank

    @property
    def world_size(self) -> int:
        return self._trainer.world_size

    @property
    def generator(self) -> torch.Generator | None:
        return self._trainer.generator

    @property
    def global_step(self) -> int:
        return self._trainer.global_step

    @property
    def prediction_type(self) -> str:
        return self._trainer.prediction_type

    @property
    def zero_stage(self) -> int:
        """The DeepSpeed ZeRO stage the policy runs under (0 without ZeRO)."""
        return getattr(self._trainer.engine, "zero_optimization_stage", lambda: 0)()

    # ---- models ----------------------------------------------------------------------------

    @property
    def policy(self):
        return self._trainer.engine

    @property
    def unet(self):
        return self._trainer.unet

    @contextlib.contextmanager
    def reference(self):
        """The frozen reference UNet (callable like the policy), without gradients.

        LoRA: the same module with its adapters disabled (no second copy in memory).
        Full fine-tuning: the frozen reference engine (sharded like the policy under ZeRO-3).
        Every rank must enter this together under ZeRO-3 (the forward gathers shards).
        """
        trainer = self._trainer
        if trainer.lora:
            module = trainer.engine.module
            module.disable_adapters()
            try:
                with torch.no_grad():
                    yield trainer.engine
            finally:
                module.enable_adapters()
        else:
            if trainer.reference_engine is None:
                raise RuntimeError("this run has no reference model (objective.needs_reference is False)")
            with torch.no_grad():
                yield trainer.reference_engine

    @contextlib.contextmanager
    def sampling(self):
        """The policy for sampling (online objectives, sample grids): eval mode, no grad.

        Every rank must sample the same number of UNet calls under ZeRO-3.

        It is the engine's module, not the engine: ZeRO-3 gathers a layer's shards in hooks on the
        module's own layers, so the module computes what the engine's forward would (that forward
        also flags the module so ZeRO-3 can gather a parameter one layer reads from another; the
        diffusers UNet has none, and the ZeRO-2/3 SPO launcher test holds the two paths equal), and
        on a GPU the engine's forward switches a caller's CUDA autocast off (DeepSpeed's
        autocast_if_enabled, when the config has no torch_autocast section), which SPO's
        half-precision rounds (method.autocast) need. (It checks torch.is_autocast_enabled()
        without a device, the CUDA state, so CPU autocast passes through either way.)
        """
        module = self._trainer.engine.module
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                yield module
        finally:
            module.train(was_training)

    def unet_output(self, model, x_t, t, embeds, pooled, time_ids) -> torch.Tensor:
        """One UNet call (policy or reference) with inputs cast to the compute dtype."""
        from spoxl.sampling import unet_eps

        cast = lambda x: x.to(self.device, self.dtype)  # noqa: E731
        t = torch.as_tensor(t, device=self.device)
        return unet_eps(model, cast(x_t), t, cast(embeds), cast(pooled), cast(time_ids))

    # ---- reporting -------------------------------------------------------------------------

    def log(self, name: str, value, step: int | None = None) -> None:
        logger = self._trainer.logger
        if logger is not None:
            logger.scalar(name, value, self.global_step if step is None else step)

    def info(self, message: str) -> None:
        logger = self._trainer.logger
        if logger is not None:
            logger.info(message)
