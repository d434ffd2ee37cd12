"""The loop's parts that are not the Trainer's state (spoxl.engine.trainer.Trainer runs the loop):

  next_batch       the next micro-batch, decided on every rank together (bad data on one rank
                   fails every rank; data that ended on one rank ends it on every rank)
  any_rank / all_ranks   small collectives over one number
  RunCost          what the run cost: optimizer steps, loop seconds, latent rows through the UNet
                   on all ranks (policy, reference, sampling: the compute measure of
                   benchmarks/alignment.py), the busiest rank's peak memory; and the
                   train.max_minutes budget
  log_sample_grid  the sample grid of the fixed prompts (every rank samples, rank 0 writes)
  NonFiniteAbort   too many non-finite steps in a row (raised on every rank together)
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from spoxl.engine.zero_utils import first_error_on_any_rank
from spoxl.errors import SharedError, SpoxlError


_clock = time.perf_counter  # the train.max_minutes clock (tests replace it)


class NonFiniteAbort(SharedError):
    """Too many consecutive optimizer steps had a NaN/inf loss or gradient (decided on every rank
    together)."""


def any_rank(flag: bool) -> bool:
    """True if `flag` is true on any rank (a collective: all ranks must call it)."""
    return all_ranks(1.0 if flag else 0.0, dist.ReduceOp.MAX) > 0


_DATA_ENDED = "\0spoxl: the objective's data ended"


def next_batch(batches):
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


def all_ranks(value: float, op) -> float:
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


def mean_metrics(acc: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in acc[0]:
        values = [float(m[key]) for m in acc if key in m]
        out[key] = sum(values) / len(values)
    return out


class RunCost:
    """What a run's loop cost, measured from its start: optimizer steps, seconds, UNet sample rows
    (a forward pre-hook on each UNet: every denoiser evaluation, whatever called it, counted once
    per sample), peak memory; and the train.max_minutes budget."""

    def __init__(self, trainer):
        self.trainer = trainer
        frozen_copy = getattr(trainer.reference_engine, "module", trainer.reference_engine)  # a DeepSpeed engine under ZeRO-3
        self.counter = UNetSampleCounter(trainer.engine.module, frozen_copy)
        self.started, self.steps_at_start, self.cuda_peak = _clock(), trainer.global_step, 0.0
        minutes = trainer.config.train.max_minutes
        self.budget_s = minutes * 60 if minutes is not None else None

    def out_of_time(self) -> bool:
        """Every rank decides together (clocks differ a little): one rank leaving early would hang the rest."""
        return self.budget_s is not None and any_rank(_clock() - self.started >= self.budget_s)

    def saw(self, logged: dict) -> None:
        self.cuda_peak = max(self.cuda_peak, logged.get("memory/cuda_peak_mib", 0.0))

    def finish(self) -> dict:
        """The cost so far (collectives: every rank calls this)."""
        self.counter.close()
        cost = {"train/steps": self.trainer.global_step - self.steps_at_start, "train/seconds": _clock() - self.started,
                "train/unet_samples": all_ranks(self.counter.count, dist.ReduceOp.SUM)}
        for key, value in _peak_memory_mib(self.trainer.device).items():
            cost[key] = all_ranks(max(value, self.cuda_peak) if "cuda" in key else value, dist.ReduceOp.MAX)
        return cost


def progress_bar(trainer):
    """A tqdm bar over optimizer steps on rank 0 (None elsewhere, or with logging.progress off)."""
    cfg = trainer.config
    if trainer.rank != 0 or not cfg.logging.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.max_steps, initial=trainer.global_step, desc="train", dynamic_ncols=True)


def log_sample_grid(trainer, logger) -> None:
    """Sample the fixed prompts with the current policy; EVERY rank runs the UNet calls (ZeRO-3
    gathers shards inside the forward), rank 0 writes the grid."""
    from spoxl.imaging import make_grid, sample_images

    lc = trainer.config.logging
    # sample_images calls components.unet, which is the engine's module (spoxl.engine.setup): the
    # policy that view.sampling() puts in eval mode
    with trainer.view.sampling():
        images = sample_images(trainer.components, list(lc.sample_prompts), steps=lc.sample_steps,
                               cfg_scale=lc.sample_cfg, seed=lc.sample_seed)
    logger.image("samples", make_grid(images), trainer.global_step)
    if trainer.rank == 0:
        from spoxl.imaging import save_grid

        save_grid(images, trainer.config.run.output_dir + f"/samples/step_{trainer.global_step:08d}.png")
