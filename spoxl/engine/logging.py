"""Run observability: TensorBoard scalars/images/hparams, a plain-text log file, memory readings.

Every rank may call every method (so call sites need no `if rank == 0`); only rank 0 writes.
The text log (<run>/train.log) receives the same lines rank 0 prints, so a finished run can be
read without TensorBoard.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def memory_stats(device: torch.device) -> dict[str, float]:
    """Resident memory of this process (MiB) and, on CUDA, the peak allocated since the last reset."""
    import psutil

    stats = {"memory/cpu_rss_mib": psutil.Process().memory_info().rss / 2**20}
    if device.type == "cuda":
        stats["memory/cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
    return stats


class MetricsLogger:
    def __init__(self, run_dir, rank: int, tensorboard: bool = True):
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.writer = None
        self.log = logging.getLogger(f"spoxl.train.rank{rank}")
        self.log.propagate = False
        self.log.setLevel(logging.INFO)
        for h in list(self.log.handlers):
            self.log.removeHandler(h)
        if rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.file_handler = logging.FileHandler(self.run_dir / "train.log")
            self.file_handler.setFormatter(logging.Formatter(_FORMAT))
            self.log.addHandler(self.file_handler)
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter("[spoxl] %(message)s"))
            self.log.addHandler(console)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        else:
            # Other ranks only report warnings (e.g. skipped steps) to their own stderr.
            console = logging.StreamHandler(sys.stderr)
            console.setFormatter(logging.Formatter(f"[spoxl rank {rank}] %(message)s"))
            console.setLevel(logging.WARNING)
            self.log.addHandler(console)

    def info(self, msg: str) -> None:
        self.log.info(msg)

    def warning(self, msg: str) -> None:
        if self.rank == 0:
            self.log.warning(msg)

    def scalar(self, name: str, value, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, float(value), step)

    def scalars(self, values: dict, step: int) -> None:
        for k, v in values.items():
            self.scalar(k, v, step)

    def image(self, name: str, image: torch.Tensor, step: int) -> None:
        """image: [3, H, W] in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(name, image.float().clamp(0, 1).cpu(), step)

    def hparams(self, flat_config: dict, final_metrics: dict) -> None:
        if self.writer is None:
            return
        # TensorBoard's hparams plugin accepts only scalars/strings/bools.
        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat_config.items()}
        self.writer.add_hparams(hp, {f"hparam/{k}": float(v) for k, v in final_metrics.items()}, run_name="hparams")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for h in list(self.log.handlers):
            h.close()
            self.log.removeHandler(h)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
