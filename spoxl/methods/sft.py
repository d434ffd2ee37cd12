"""Supervised fine-tuning: the denoising MSE on image-caption data.

For each sample: x0 = VAE latents of the image, t ~ U{0..T-1}, noise ~ N(0, I),
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, and the UNet learns the training target (the noise for
epsilon prediction, v for v-prediction). Optional min-SNR-gamma weighting (Hang et al. 2023):
weight = min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v.

Data: `data.path` None trains on a small deterministic synthetic set (coloured squares with
captions; tests and smoke runs); otherwise spoxl.data.captions.ImageCaptionDataset (an image
folder with .txt captions, or a .jsonl/.parquet table). Images and captions are encoded by the
frozen VAE / text encoders per micro-batch, or once into `data.cache_dir` (spoxl.data.cache).
Each rank walks its own equal-sized shard of a per-epoch permutation, so the data position is
just (epoch, index) and resuming is exact (spoxl.methods._offline, shared with DPO and MaPO).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from spoxl.engine.view import RunView
from spoxl.methods._offline import OfflineObjective, encode_and_noise
from spoxl.sampling import add_noise, training_target


@dataclass
class SFTConfig:
    snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting; None: plain MSE
    # Debug/sanity mode: the same noise, timesteps and VAE sample at every step, so a fixed batch
    # gives a deterministic loss that must go down (the "overfit one batch" check).
    fixed_noise: bool = False


class SFTObjective(OfflineObjective):
    name = "sft"
    Config = SFTConfig
    data_kind = "captions"

    def loss(self, run: RunView, batch):
        batch, noise, t, a = encode_and_noise(run, batch, self.noise)
        x0 = batch["latents"].to(run.device, torch.float32)
        x_t = add_noise(x0, noise, a)
        output = run.unet_output(run.policy, x_t, t, batch["prompt_embeds"], batch["pooled_prompt_embeds"],
                                 batch["time_ids"])
        target = training_target(x0, noise, a, run.prediction_type)
        mse = (output.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))  # per sample, fp32
        weight = snr_weight(a, self.config.snr_gamma, run.prediction_type)
        loss = (weight * mse).mean()
        return loss, {"mse": mse.mean().detach(), "timestep": t.float().mean()}


def snr_weight(a: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Per-sample min-SNR-gamma weights (ones when gamma is None). SNR = a / (1 - a)."""
    if gamma is None:
        return torch.ones_like(a)
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


OBJECTIVE = SFTObjective
