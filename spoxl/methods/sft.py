"""Supervised fine-tuning: the denoising MSE on image-caption data.

For each sample: x0 = VAE latents of the image, t ~ U{0..T-1}, noise ~ N(0, I),
x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, and the UNet learns the training target (the noise for
epsilon prediction, v for v-prediction). Optional min-SNR-gamma weighting (Hang et al. 2023):
weight = min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v.

Data: `data.path` None trains on a small deterministic synthetic set (coloured blocks with
captions; tests and smoke runs); otherwise the image-caption dataset of spoxl.data. Latents and
text embeddings are encoded once at setup (cached on disk by spoxl.data when `data.cache_dir`
is set). Each rank walks its own shard of a per-epoch permutation, so the data position is just
(epoch, index) and resuming is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from spoxl.errors import SpoxlError
from spoxl.methods.base import Objective, TrainContext
from spoxl.sampling import add_noise, alpha_bar, training_target

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
           "white": (1.0, 1.0, 1.0), "yellow": (1.0, 1.0, -1.0), "cyan": (-1.0, 1.0, 1.0)}


def synthetic_images(n: int, resolution: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """n images in [-1, 1]: a coloured square at a seeded position on black, and its caption."""
    g = torch.Generator().manual_seed(seed)
    names = list(COLOURS)
    images = torch.full((n, 3, resolution, resolution), -1.0)
    captions = []
    side = resolution // 2
    for i in range(n):
        name = names[i % len(names)]
        y, x = torch.randint(0, resolution - side + 1, (2,), generator=g).tolist()
        images[i, :, y:y + side, x:x + side] = torch.tensor(COLOURS[name]).view(3, 1, 1)
        captions.append(f"a {name} square")
    return images, captions


@dataclass
class SFTConfig:
    snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting; None: plain MSE
    encode_batch_size: int = 8  # images per VAE/text-encoder call when encoding the dataset


class SFTObjective(Objective):
    name = "sft"
    Config = SFTConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.epoch = 0
        self.index = 0  # micro-batches consumed in this epoch on this rank
        self.data: dict[str, torch.Tensor] | None = None

    # ---- data ---------------------------------------------------------------------------------

    def setup(self, ctx: TrainContext) -> None:
        cfg = ctx.config
        if cfg.data.path is None:
            images, captions = synthetic_images(cfg.data.synthetic_size, cfg.data.resolution, cfg.run.seed)
            self.data = encode_dataset(ctx, images, captions, self.config.encode_batch_size)
        else:
            self.data = load_encoded_dataset(ctx, self.config.encode_batch_size)
        n = len(self.data["latents"])
        per_rank = n // ctx.world_size
        if per_rank < cfg.train.micro_batch_size:
            raise SpoxlError(f"dataset has {n} samples: too few for {ctx.world_size} ranks x "
                             f"micro_batch_size {cfg.train.micro_batch_size}")
        self.batches_per_epoch = per_rank // cfg.train.micro_batch_size

    def _order(self, ctx: TrainContext, epoch: int) -> torch.Tensor:
        n = len(self.data["latents"])
        if ctx.config.data.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.config.run.seed + epoch))
        else:
            order = torch.arange(n)
        return order[ctx.rank::ctx.world_size]  # this rank's shard; equal size on every rank

    def micro_batches(self, ctx: TrainContext):
        mb = ctx.config.train.micro_batch_size
        while True:
            order = self._order(ctx, self.epoch)
            while self.index < self.batches_per_epoch:
                idx = order[self.index * mb:(self.index + 1) * mb]
                self.index += 1
                yield {k: v[idx] for k, v in self.data.items()}
            self.epoch += 1
            self.index = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    # ---- loss ---------------------------------------------------------------------------------

    def loss(self, ctx: TrainContext, batch):
        x0 = batch["latents"].to(ctx.device, torch.float32)
        b = x0.shape[0]
        scheduler = ctx.components.scheduler
        noise = torch.randn(x0.shape, generator=ctx.generator, device=ctx.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=ctx.generator, device=ctx.device)
        a = alpha_bar(scheduler, t.cpu()).to(ctx.device)
        x_t = add_noise(x0, noise, a)
        output = ctx.unet_output(ctx.policy, x_t, t, batch["embeds"], batch["pooled"], batch["time_ids"])
        target = training_target(x0, noise, a, ctx.prediction_type)
        mse = (output.float() - target.float()).pow(2).mean(dim=tuple(range(1, x0.ndim)))  # per sample, fp32
        weight = snr_weight(a, self.config.snr_gamma, ctx.prediction_type)
        loss = (weight * mse).mean()
        return loss, {"mse": mse.mean().detach(), "timestep": t.float().mean()}


def snr_weight(a: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Per-sample min-SNR-gamma weights (ones when gamma is None). SNR = a / (1 - a)."""
    if gamma is None:
        return torch.ones_like(a)
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


@torch.no_grad()
def encode_dataset(ctx: TrainContext, images: torch.Tensor, captions: list[str], batch_size: int) -> dict:
    """VAE latents (distribution mean: deterministic, equal on every rank) + text embeddings."""
    from spoxl.models.text import encode_prompts, make_time_ids

    comps = ctx.components
    vae_dtype = next(comps.vae.parameters()).dtype
    latents, embeds, pooled = [], [], []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size].to(ctx.device, vae_dtype)
        latents.append(comps.vae.encode(chunk).latent_dist.mean.float().cpu() * comps.vae.config.scaling_factor)
        pe = encode_prompts(comps, captions[i:i + batch_size])
        embeds.append(pe.embeds.float().cpu())
        pooled.append(pe.pooled.float().cpu())
    res = images.shape[-1]
    return {
        "latents": torch.cat(latents),
        "embeds": torch.cat(embeds),
        "pooled": torch.cat(pooled),
        "time_ids": make_time_ids(len(images), (res, res)),
    }


def load_encoded_dataset(ctx: TrainContext, batch_size: int) -> dict:
    """The configured image-caption dataset, encoded (spoxl.data does reading and caching)."""
    raise SpoxlError("data.path datasets are not wired yet (spoxl.data pending); leave data.path empty "
                     "for the synthetic set")


OBJECTIVE = SFTObjective
