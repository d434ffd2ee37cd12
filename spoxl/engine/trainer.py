"""The Trainer: the one owner of a run's state, and its loop.

It holds what changes during a run -- the optimizer-step counter, the DeepSpeed engine, the frozen
reference, the EMA, the logger, the newest checkpoint -- and is the only thing that changes it.
Objectives see the run through a narrow read-only view (spoxl.engine.view.RunView, `trainer.view`);
checkpoints (spoxl.engine.checkpoint) save and restore the Trainer's state and the objective's.

The loop, per optimizer step (every rank runs every line: ZeRO-3 needs every rank in every forward):

    for each of grad_accum micro-steps:
        batch = next(objective's micro-batches)        (online objectives sample here)
        loss, metrics = objective.loss(view, batch); engine.backward(loss); engine.step()
    a skipped update (non-finite loss or gradient, fp16 overflow): _skipped_update decides
    log, sample a grid now and then, checkpoint every N steps
    stop at train.max_steps, at train.max_minutes (decided on every rank together), or when the
    objective's data ends (SPO's method.epochs)

Built by spoxl.engine.setup.build_training.
"""

from __future__ import annotations

import time

import torch

from spoxl.engine import checkpoint, loop
from spoxl.engine.logging import memory_stats
from spoxl.engine.view import RunView


class Trainer:
    def __init__(self, *, config, objective, components, engine, reference_engine, rank: int, world_size: int,
                 device: torch.device, dtype: torch.dtype, generator: torch.Generator, lora: bool):  # fmt: skip
        self.config = config
        self.objective = objective
        self.components = components
        self.engine = engine
        self.reference_engine = reference_engine  # full fine-tuning only: a frozen copy
        self.rank, self.world_size = rank, world_size
        self.device, self.dtype = device, dtype  # dtype: the compute dtype of the UNet's inputs
        self.generator = generator  # per-rank (spoxl.rng.RANK_STREAM), saved in checkpoints
        self.lora = lora
        self.logger = None  # spoxl.engine.logging.MetricsLogger (rank 0 writes; every rank may call)
        self.ema = None  # spoxl.engine.ema.EMA when ema.enabled
        self.global_step = 0  # optimizer steps done
        self.last_checkpoint_step = -1  # step of the newest checkpoint saved or loaded in this run
        self.view = RunView(self)

    @property
    def unet(self):
        """The diffusers UNet under the engine (LoRA adapters included)."""
        return self.engine.module

    @property
    def prediction_type(self) -> str:
        configured = getattr(self.config.model, "prediction_type", None)
        return configured or self.components.scheduler.config.prediction_type

    # ---- checkpoints -----------------------------------------------------------------------

    def save_checkpoint(self, **kwargs) -> str:
        cfg = self.config
        return checkpoint.save(self, self.objective, cfg.checkpoint_dir, cfg.checkpoint.keep_last, **kwargs)

    def resume(self) -> str | None:
        """Load the newest complete checkpoint (None when there is none)."""
        cfg = self.config
        return checkpoint.load(self, self.objective, cfg.checkpoint_dir, universal=cfg.checkpoint.load_universal)

    # ---- the loop --------------------------------------------------------------------------

    def train(self) -> dict:
        """Run until train.max_steps optimizer steps are done (or the time or the data runs out);
        returns the last logged scalars plus what the run cost (spoxl.engine.loop.RunCost)."""
        cfg, engine, logger = self.config, self.engine, self.logger
        batches = self.objective.micro_batches(self.view)
        progress = loop.progress_bar(self)
        cost = loop.RunCost(self)
        last: dict[str, float] = {}
        while self.global_step < cfg.train.max_steps:
            if cost.out_of_time():
                logger.info(f"train.max_minutes={cfg.train.max_minutes:g} reached after step {self.global_step}: stopping")
                break
            started, skipped_before, lr = time.perf_counter(), engine.skipped_steps, engine.get_lr()[0]
            step = self._accumulate(batches)
            if step is None:  # a partly accumulated last step is dropped
                logger.info(f"the objective's data ended after step {self.global_step} (method.epochs): stopping")
                break
            losses, metrics, bad_loss = step
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if self._skipped_update(engine.skipped_steps > skipped_before, bad_loss, losses, grad_norm):
                continue
            self.global_step += 1
            if self.ema is not None:
                self.ema.update(engine, self.global_step)  # collective under ZeRO-3
            step_time = time.perf_counter() - started
            if self.global_step % cfg.logging.every == 0 or self.global_step == cfg.train.max_steps:
                last = self._log_step(losses, metrics, lr, grad_norm, step_time)
                cost.saw(last)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")
            if cfg.logging.sample_every and self.global_step % cfg.logging.sample_every == 0:
                loop.log_sample_grid(self, logger)
            if cfg.checkpoint.every and self.global_step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
        if progress is not None:
            progress.close()
        last.update(cost.finish())
        # Decided from in-memory state, identical on every rank (ranks of a multi-node job may not
        # share a filesystem view, and a save is collective).
        if cfg.checkpoint.save_final and self.last_checkpoint_step != self.global_step:
            self.save_checkpoint()
        last["train/nonfinite_steps"] = self._nonfinite_total
        return last

    # ---- one step's parts ------------------------------------------------------------------

    _nonfinite_in_a_row = 0
    _nonfinite_total = 0

    def _accumulate(self, batches):
        """train.grad_accum micro-steps: (losses, metrics, any rank's loss non-finite), or None when
        the objective's data ended (on every rank at once)."""
        losses, metrics, bad_loss = [], [], False
        for _ in range(self.config.train.grad_accum):
            batch = loop.next_batch(batches)
            if batch is None:
                return None
            loss, m = self.objective.loss(self.view, batch)
            bad_loss |= not bool(torch.isfinite(loss.detach()).all())
            self.engine.backward(loss)
            self.engine.step()  # applies the optimizer only at the accumulation boundary
            losses.append(float(loss.detach().float()))
            metrics.append(m)
        return losses, metrics, loop.any_rank(bad_loss)

    def _skipped_update(self, skipped: bool, bad_loss: bool, losses, grad_norm: float) -> bool:
        """Whether DeepSpeed skipped this update (then the step counter does not advance, so the run
        still ends after max_steps good updates). fp16 overflows are normal while the loss scale
        settles; train.max_nonfinite_steps NaN/inf steps in a row save the state and abort."""
        cfg, logger = self.config, self.logger
        if bad_loss and not skipped:
            # DeepSpeed checks the gradient norm; a non-finite loss with a finite gradient (rare)
            # was applied. Say so: the weights are still finite, but the step was meaningless.
            logger.warning(f"step {self.global_step + 1}: non-finite loss but finite gradients; DeepSpeed applied the step")
        if skipped and not bad_loss and cfg.deepspeed.precision == "fp16":
            logger.info(f"step {self.global_step + 1}: fp16 gradient overflow, update skipped "
                        f"(loss scale now {getattr(self.engine.optimizer, 'loss_scale', '?')})")
            return True
        if not skipped:
            self._nonfinite_in_a_row = 0
            return False
        self._nonfinite_in_a_row += 1
        self._nonfinite_total += 1
        logger.warning(f"step {self.global_step + 1}: non-finite loss/gradient (loss {losses}, grad norm "
                       f"{grad_norm}); update skipped ({self._nonfinite_in_a_row} in a row, {self._nonfinite_total} total)")
        logger.scalar("train/nonfinite_steps", self._nonfinite_total, self.global_step)
        if self._nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
            raise loop.NonFiniteAbort(self._abort_message(self._nonfinite_in_a_row))
        return True

    def _log_step(self, losses, metrics, lr: float, grad_norm: float, step_time: float) -> dict:
        cfg = self.config
        samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * self.world_size
        last = {
            "train/loss": sum(losses) / len(losses),
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/step_time_s": step_time,
            "train/samples_per_s": samples_per_step / step_time,
            **{f"train/{k}": v for k, v in loop.mean_metrics(metrics).items()},
            **memory_stats(self.device),
        }
        self.logger.scalars(last, self.global_step)
        self.logger.info(f"step {self.global_step}/{cfg.train.max_steps} loss {last['train/loss']:.5f} "
                         f"lr {last['train/lr']:.3g} grad_norm {grad_norm:.4g} {step_time:.2f}s/step")
        return last

    def _abort_message(self, in_a_row: int) -> str:
        """The abort message, after keeping the state at the abort for inspection.

        Weights that led to NaN/inf are not trustworthy even when finite (a huge learning rate makes
        them ~1e30 before anything overflows), so they never become a resume point: they are saved as
        aborted_step_N (not `latest`, never pruned, never resumed); the resume point stays the newest
        checkpoint saved before the abort."""
        cfg = self.config
        aborted = self.save_checkpoint(tag=checkpoint.ABORTED_PREFIX + checkpoint.tag_for(self.global_step), publish=False)
        resume = checkpoint.latest_tag(cfg.checkpoint_dir)
        where = (f"--resume continues from {cfg.checkpoint_dir / resume}, the newest checkpoint saved before the abort"
                 if resume else "no checkpoint was saved before the abort (set checkpoint.every to keep resume points)")
        return (f"{in_a_row} optimizer steps in a row had a NaN/inf loss or gradient; aborting. {where}; the state at "
                f"the abort is kept as {cfg.checkpoint_dir / aborted} for inspection (lower train.lr, check the data, "
                f"or use bf16 instead of fp16)")

