"""The training loop, top to bottom.

    for each optimizer step:
        for each of grad_accum micro-steps:
            batch = next(objective's micro-batches)       (online objectives sample here)
            loss, metrics = objective.loss(ctx, batch)
            engine.backward(loss); engine.step()          (DeepSpeed steps on the boundary)
        a non-finite loss or gradient norm: DeepSpeed skipped the update; count it, and after
            train.max_nonfinite_steps in a row save the last good state and abort
        log scalars, sample a grid now and then, checkpoint every N steps
        train.max_minutes passed (on any rank): stop before the next step
        the objective's micro_batches ended (SPO's method.epochs): stop

Returns the last logged scalars plus what the run cost: optimizer steps, loop seconds, latent rows
through the UNet on all ranks (policy, reference, sampling: the compute measure of
benchmarks/alignment.py) and the peak memory of the busiest rank.

Every rank runs every line (ZeRO-3 needs every rank in every forward); only rank 0 writes logs.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from spoxl.engine import checkpoint
from spoxl.engine.logging import memory_stats
from spoxl.engine.zero_utils import first_error_on_any_rank
from spoxl.errors import SharedError, SpoxlError


_clock = time.perf_counter  # the train.max_minutes clock (tests replace it)


class NonFiniteAbort(SharedError):
    """Too many consecutive optimizer steps had a NaN/inf loss or gradient (decided on every rank
    together)."""


def _any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank (a collective: all ranks must call it)."""
    return _all_ranks(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0


_DATA_ENDED = "\0spoxl: the objective's data ended"


def _next_batch(batches):
    """The next micro-batch, failing on EVERY rank when any rank's data is bad (an unreadable
    image on one rank would otherwise leave the others waiting in a collective until timeout),
    and None on every rank when any rank's data ended (SPO's method.epochs): decided together in
    the one collective this already runs, so ranks never part ways."""
    error = None
    try:
        batch = next(batches)
    except StopIteration:
        error, batch = _DATA_ENDED, None
    except SpoxlError as e:
        error, batch = str(e), None
    first = first_error_on_any_rank(error)
    if first == _DATA_ENDED:
        return None
    if first is not None:
        raise SharedError(first)
    return batch


def _all_ranks(value: float, op) -> float:
    """`value` reduced over ranks with `op` (a collective: all ranks must call it)."""
    t = torch.tensor([float(value)], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=op)
    return float(t.item())


class UNetSampleCounter:
    """Counts latent rows through the UNet(s) of a run. A forward pre-hook on each diffusers UNet
    (the trained one, which LoRA reference passes and SPO's sampling also reach, and a frozen
    full-fine-tuning reference): every denoiser evaluation, whatever called it, is counted once
    per sample. (NCP's frozen encoder copy is a part of a UNet and is not counted.)"""

    def __init__(self, *unets):
        self.count = 0
        self.handles = [u.register_forward_pre_hook(self._hook, with_kwargs=True) for u in unets if u is not None]

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if sample is not None:
            self.count += int(sample.shape[0])

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (Linux), else ru_maxrss. Not ru_maxrss first: a
    child's ru_maxrss starts at its parent's RSS when it forked (it survives exec), so a rank
    spawned by a 250 MB launcher could never report less."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError):
        import resource
        import sys

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / (2**20 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def _peak_memory_mib(device: torch.device) -> dict[str, float]:
    """This process's peak resident memory (MiB) and, on CUDA, the peak allocated since the last reset."""
    peak = {"memory/peak_rss_mib": peak_rss_mib()}
    if device.type == "cuda":
        peak["memory/cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def _mean_metrics(acc: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in acc[0]:
        values = [float(m[key]) for m in acc if key in m]
        out[key] = sum(values) / len(values)
    return out


def train(ctx, objective, logger) -> dict:
    """Run until train.max_steps optimizer steps are done; returns the last logged scalars."""
    cfg = ctx.config
    engine = ctx.engine
    batches = objective.micro_batches(ctx)
    progress = None
    if ctx.rank == 0 and cfg.logging.progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.train.max_steps, initial=ctx.global_step, desc="train", dynamic_ncols=True)

    nonfinite_in_a_row = 0
    nonfinite_total = 0
    last: dict[str, float] = {}
    samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * ctx.world_size
    frozen_copy = getattr(ctx.reference_engine, "module", ctx.reference_engine)  # a DeepSpeed engine under ZeRO-3
    counter = UNetSampleCounter(engine.module, frozen_copy)
    loop_started, steps_at_start, cuda_peak = _clock(), ctx.global_step, 0.0
    budget_s = cfg.train.max_minutes * 60 if cfg.train.max_minutes is not None else None
    while ctx.global_step < cfg.train.max_steps:
        # Every rank decides together (clocks differ a little): one rank leaving early would hang the rest.
        if budget_s is not None and _any_rank(_clock() - loop_started >= budget_s):
            logger.info(f"train.max_minutes={cfg.train.max_minutes:g} reached after step {ctx.global_step}: stopping")
            break
        started = time.perf_counter()
        metrics, losses, bad_loss = [], [], False
        skipped_before = engine.skipped_steps
        lr = engine.get_lr()[0]  # the rate this step's update uses (the scheduler advances in step())
        ended = False
        for _ in range(cfg.train.grad_accum):
            batch = _next_batch(batches)
            if batch is None:
                ended = True
                break
            loss, m = objective.loss(ctx, batch)
            bad_loss |= not bool(torch.isfinite(loss.detach()).all())
            engine.backward(loss)
            engine.step()  # applies the optimizer only at the accumulation boundary
            losses.append(float(loss.detach().float()))
            metrics.append(m)
        if ended:  # a partly accumulated last step is dropped
            logger.info(f"the objective's data ended after step {ctx.global_step} (method.epochs): stopping")
            break
        bad_loss = _any_rank(bad_loss)
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        skipped = engine.skipped_steps > skipped_before
        if bad_loss and not skipped:
            # DeepSpeed checks the gradient norm; a non-finite loss with a finite gradient (rare)
            # was applied. Say so: the weights are still finite, but the step was meaningless.
            logger.warning(f"step {ctx.global_step + 1}: non-finite loss but finite gradients; DeepSpeed applied the step")

        if skipped and not bad_loss and cfg.deepspeed.precision == "fp16":
            # fp16 dynamic loss scaling: an overflow lowers the scale and skips the update. Normal
            # while the scale settles; not counted towards the abort (a NaN loss still is).
            logger.info(f"step {ctx.global_step + 1}: fp16 gradient overflow, update skipped "
                        f"(loss scale now {getattr(engine.optimizer, 'loss_scale', '?')})")
            continue
        if skipped:
            # DeepSpeed did not apply the update (and did not advance the LR schedule); nor do we
            # advance the step counter, so the run still ends after max_steps good updates.
            nonfinite_in_a_row += 1
            nonfinite_total += 1
            logger.warning(f"step {ctx.global_step + 1}: non-finite loss/gradient (loss {losses}, grad norm "
                           f"{grad_norm}); update skipped ({nonfinite_in_a_row} in a row, {nonfinite_total} total)")
            logger.scalar("train/nonfinite_steps", nonfinite_total, ctx.global_step)
            if nonfinite_in_a_row >= cfg.train.max_nonfinite_steps:
                raise NonFiniteAbort(_abort(ctx, objective, nonfinite_in_a_row))
            continue
        nonfinite_in_a_row = 0
        ctx.global_step += 1
        if ctx.ema is not None:
            ctx.ema.update(engine, ctx.global_step)  # collective under ZeRO-3
        step_time = time.perf_counter() - started

        if ctx.global_step % cfg.logging.every == 0 or ctx.global_step == cfg.train.max_steps:
            last = {
                "train/loss": sum(losses) / len(losses),
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/step_time_s": step_time,
                "train/samples_per_s": samples_per_step / step_time,
                **{f"train/{k}": v for k, v in _mean_metrics(metrics).items()},
                **memory_stats(ctx.device),
            }
            cuda_peak = max(cuda_peak, last.get("memory/cuda_peak_mib", 0.0))
            logger.scalars(last, ctx.global_step)
            logger.info(f"step {ctx.global_step}/{cfg.train.max_steps} loss {last['train/loss']:.5f} "
                        f"lr {last['train/lr']:.3g} grad_norm {grad_norm:.4g} {step_time:.2f}s/step")
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")

        if cfg.logging.sample_every and ctx.global_step % cfg.logging.sample_every == 0:
            log_sample_grid(ctx, logger)
        if cfg.checkpoint.every and ctx.global_step % cfg.checkpoint.every == 0:
            checkpoint.save(ctx, objective, cfg.checkpoint_dir, cfg.checkpoint.keep_last)

    if progress is not None:
        progress.close()
    counter.close()
    cost = {"train/steps": ctx.global_step - steps_at_start, "train/seconds": _clock() - loop_started,
            "train/unet_samples": _all_ranks(counter.count, dist.ReduceOp.SUM)}
    for key, value in _peak_memory_mib(ctx.device).items():
        cost[key] = _all_ranks(max(value, cuda_peak) if "cuda" in key else value,
                               dist.ReduceOp.MAX)
    # Decided from in-memory state, identical on every rank (ranks of a multi-node job may not
    # share a filesystem view, and a save is collective).
    if cfg.checkpoint.save_final and ctx.last_checkpoint_step != ctx.global_step:
        checkpoint.save(ctx, objective, cfg.checkpoint_dir, cfg.checkpoint.keep_last)
    last["train/nonfinite_steps"] = nonfinite_total
    last.update(cost)
    return last


def _abort(ctx, objective, in_a_row: int) -> str:
    """The abort message, after keeping the state at the abort for inspection.

    Weights that led to NaN/inf are not trustworthy even when finite (a huge learning rate makes
    them ~1e30 before anything overflows), so they never become a resume point: they are saved as
    aborted_step_N (not `latest`, never pruned, never resumed); the resume point stays the newest
    checkpoint saved before the abort."""
    cfg = ctx.config
    aborted = checkpoint.save(ctx, objective, cfg.checkpoint_dir, cfg.checkpoint.keep_last,
                              tag=checkpoint.ABORTED_PREFIX + checkpoint.tag_for(ctx.global_step), publish=False)
    resume = checkpoint.latest_tag(cfg.checkpoint_dir)
    where = (f"--resume continues from {cfg.checkpoint_dir / resume}, the newest checkpoint saved before the abort"
             if resume else "no checkpoint was saved before the abort (set checkpoint.every to keep resume points)")
    return (f"{in_a_row} optimizer steps in a row had a NaN/inf loss or gradient; aborting. {where}; the state at "
            f"the abort is kept as {cfg.checkpoint_dir / aborted} for inspection (lower train.lr, check the data, "
            f"or use bf16 instead of fp16)")


def log_sample_grid(ctx, logger) -> None:
    """Sample the fixed prompts with the current policy; EVERY rank runs the UNet calls (ZeRO-3
    gathers shards inside the forward), rank 0 writes the grid."""
    from spoxl.imaging import make_grid, sample_images

    lc = ctx.config.logging
    with ctx.sampling() as policy:
        comps = ctx.components
        original = comps.unet
        comps.unet = EngineAsUNet(policy)  # sample_images calls components.unet: route calls through the engine
        try:
            images = sample_images(comps, list(lc.sample_prompts), steps=lc.sample_steps, cfg_scale=lc.sample_cfg,
                                   seed=lc.sample_seed)
        finally:
            comps.unet = original
    logger.image("samples", make_grid(images), ctx.global_step)
    if ctx.rank == 0:
        from spoxl.imaging import save_grid

        save_grid(images, ctx.config.run.output_dir + f"/samples/step_{ctx.global_step:08d}.png")


class EngineAsUNet:
    """Looks like the diffusers UNet (config, dtype, parameters) but calls go through the engine."""

    def __init__(self, engine):
        self._engine = engine

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine.module, name)
