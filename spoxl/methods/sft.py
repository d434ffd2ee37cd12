"""Supervised fine-tuning: the denoising MSE on image-caption data (placeholder, being built)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spoxl.methods.base import Objective


@dataclass
class SFTConfig:
    snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting (Hang et al. 2023); None: plain MSE


class SFTObjective(Objective):
    name = "sft"
    Config = SFTConfig


OBJECTIVE = SFTObjective
