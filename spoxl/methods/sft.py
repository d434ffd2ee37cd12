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
just (epoch, index) and resuming is exact.
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


class SyntheticCaptionDataset(torch.utils.data.Dataset):
    """n images in [-1, 1]: a coloured square at a seeded position on black, captioned by colour.
    Items look like spoxl.data.captions.ImageCaptionDataset's."""

    def __init__(self, n: int, resolution: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        names = list(COLOURS)
        side = resolution // 2
        self.resolution = resolution
        self.items = []
        for i in range(n):
            name = names[i % len(names)]
            y, x = torch.randint(0, resolution - side + 1, (2,), generator=g).tolist()
            pixels = torch.full((3, resolution, resolution), -1.0)
            pixels[:, y:y + side, x:x + side] = torch.tensor(COLOURS[name]).view(3, 1, 1)
            self.items.append((pixels, f"a {name} square"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from spoxl.models.text import make_time_ids

        pixels, caption = self.items[i]
        r = self.resolution
        return {"pixels": pixels, "caption": caption, "time_ids": make_time_ids(1, (r, r))[0], "index": i}

    def cache_key(self, i: int) -> str:
        import hashlib

        pixels, caption = self.items[i]
        return hashlib.sha256(pixels.numpy().tobytes() + caption.encode()).hexdigest()[:32]


def build_dataset(cfg):
    d = cfg.data
    if d.path is None:
        return SyntheticCaptionDataset(d.synthetic_size, d.resolution, cfg.run.seed)
    from spoxl.data.captions import ImageCaptionDataset

    return ImageCaptionDataset(d.path, d.resolution, crop=d.crop, hflip=d.hflip, seed=cfg.run.seed,
                               image_column=d.image_column, caption_column=d.caption_column)


@dataclass
class SFTConfig:
    snr_gamma: Optional[float] = None  # min-SNR-gamma loss weighting; None: plain MSE
    # Debug/sanity mode: the same noise, timesteps and VAE sample at every step, so a fixed batch
    # gives a deterministic loss that must go down (the "overfit one batch" check).
    fixed_noise: bool = False


class SFTObjective(Objective):
    name = "sft"
    Config = SFTConfig

    def __init__(self, config=None):
        super().__init__(config)
        self.epoch = 0
        self.index = 0  # micro-batches consumed in this epoch on this rank
        self.dataset = None

    # ---- data ---------------------------------------------------------------------------------

    def check(self, config) -> None:
        self.dataset = build_dataset(config)  # opening it checks the path, columns, captions

    def setup(self, ctx: TrainContext) -> None:
        if self.dataset is None:
            self.dataset = build_dataset(ctx.config)
        if ctx.config.data.cache_dir:
            from spoxl.data.cache import CachedDataset

            # Every rank encodes its share of the missing entries, then all meet at a barrier.
            self.dataset = CachedDataset(self.dataset, ctx.components, ctx.config.data.cache_dir)
            encoded = self.dataset.build(ctx.rank, ctx.world_size)
            if ctx.logger is not None:
                ctx.logger.info(f"latent/text cache {ctx.config.data.cache_dir}: {encoded} item(s) encoded on rank 0")
        n, mb = len(self.dataset), ctx.config.train.micro_batch_size
        per_rank = n // ctx.world_size
        if per_rank < mb:
            raise SpoxlError(f"dataset has {n} samples: too few for {ctx.world_size} rank(s) x "
                             f"micro_batch_size {mb}")
        self.batches_per_epoch = per_rank // mb

    def _order(self, ctx: TrainContext, epoch: int) -> torch.Tensor:
        n = len(self.dataset)
        if ctx.config.data.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(ctx.config.run.seed + epoch))
        else:
            order = torch.arange(n)
        per_rank = n // ctx.world_size  # every rank gets the same count (ZeRO-3: same number of forwards)
        return order[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]

    def micro_batches(self, ctx: TrainContext):
        mb = ctx.config.train.micro_batch_size
        while True:
            order = self._order(ctx, self.epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            while self.index < self.batches_per_epoch:
                idx = order[self.index * mb:(self.index + 1) * mb].tolist()
                self.index += 1
                yield torch.utils.data.default_collate([self.dataset[i] for i in idx])
            self.epoch += 1
            self.index = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    # ---- loss ---------------------------------------------------------------------------------

    def loss(self, ctx: TrainContext, batch):
        from spoxl.data.cache import maybe_encode

        gen = ctx.generator
        if self.config.fixed_noise:
            gen = torch.Generator(device=ctx.device).manual_seed(ctx.config.run.seed * 1000 + ctx.rank)
        # Latents + text embeddings (read from the cache when data.cache_dir is set). The VAE
        # sample noise is drawn on the CPU: from `gen` on CPU runs; on GPUs from the (checkpointed)
        # global CPU RNG, or a fixed CPU generator in fixed_noise mode.
        vae_gen = gen
        if gen.device.type != "cpu":
            vae_gen = torch.Generator().manual_seed(ctx.config.run.seed * 1000 + ctx.rank) if self.config.fixed_noise else None
        batch = maybe_encode(ctx.components, batch, generator=vae_gen)
        x0 = batch["latents"].to(ctx.device, torch.float32)
        b = x0.shape[0]
        scheduler = ctx.components.scheduler
        noise = torch.randn(x0.shape, generator=gen, device=ctx.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen, device=ctx.device)
        a = alpha_bar(scheduler, t.cpu()).to(ctx.device)
        x_t = add_noise(x0, noise, a)
        output = ctx.unet_output(ctx.policy, x_t, t, batch["prompt_embeds"], batch["pooled_prompt_embeds"],
                                 batch["time_ids"])
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


OBJECTIVE = SFTObjective
