"""What the offline objectives (SFT, Diffusion-DPO, MaPO, NCP) share: walking a dataset, and drawing
the noise and timesteps of a denoising loss.

  OfflineObjective      check/setup/micro_batches/state_dict over `self.build_dataset(cfg)`:
                        optional latent/text cache (data.cache_dir), then each rank walks its own
                        equal-sized shard of a per-epoch permutation, so the data position is just
                        (epoch, index) and resuming is exact. Subclasses define build_dataset + loss.
  encode_and_noise      latents + text embeddings of a batch, then noise ~ N(0, I), t ~ U{0..T-1}
                        and alpha_bar(t), all from one generator stream (fixed_noise-aware).
  SyntheticCaptionDataset / SyntheticPairDataset
                        the small deterministic data sets used when data.path is null.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass

import torch

from spoxl import rng
from spoxl.errors import SpoxlError
from spoxl.engine.view import RunView
from spoxl.methods.base import Objective
from spoxl.sampling import add_noise, alpha_bar, training_target

COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0),
           "white": (1.0, 1.0, 1.0), "yellow": (1.0, 1.0, -1.0), "cyan": (-1.0, 1.0, 1.0)}


def _square(colour: str, y: int, x: int, resolution: int) -> torch.Tensor:
    side = resolution // 2
    pixels = torch.full((3, resolution, resolution), -1.0)
    pixels[:, y:y + side, x:x + side] = torch.tensor(COLOURS[colour]).view(3, 1, 1)
    return pixels


def _position(g: torch.Generator, resolution: int) -> tuple[int, int]:
    y, x = torch.randint(0, resolution - resolution // 2 + 1, (2,), generator=g).tolist()
    return y, x


def _digest(*tensors: torch.Tensor, text: str) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.numpy().tobytes())
    h.update(text.encode())
    return h.hexdigest()[:32]


class SyntheticCaptionDataset(torch.utils.data.Dataset):
    """n images in [-1, 1]: a coloured square at a seeded position on black, captioned by colour.
    Items look like spoxl.data.captions.ImageCaptionDataset's."""

    def __init__(self, n: int, resolution: int, seed: int = 0):
        g = rng.generator(rng.SYNTHETIC_DATA, seed)
        names = list(COLOURS)
        self.resolution = resolution
        self.items = []
        for i in range(n):
            name = names[i % len(names)]
            self.items.append((_square(name, *_position(g, resolution), resolution), f"a {name} square"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from spoxl.models.text import make_time_ids

        pixels, caption = self.items[i]
        r = self.resolution
        return {"pixels": pixels, "caption": caption, "time_ids": make_time_ids(1, (r, r))[0], "index": i}

    def cache_key(self, i: int) -> str:
        pixels, caption = self.items[i]
        return _digest(pixels, text=caption)


class SyntheticPairDataset(torch.utils.data.Dataset):
    """n preference pairs in [-1, 1]: the winner is a square of the caption's colour, the loser the
    same square (same position, so only the colour differs) in another colour. Items look like
    spoxl.data.pairs.PreferencePairDataset's (winner first)."""

    def __init__(self, n: int, resolution: int, seed: int = 0):
        g = rng.generator(rng.SYNTHETIC_DATA, seed)
        names = list(COLOURS)
        self.resolution = resolution
        self.items = []
        for i in range(n):
            # The loser's colour cycles through the 5 others (offset 1..5, never 0) as i grows.
            offset = 1 + (i // len(names)) % (len(names) - 1)
            name, wrong = names[i % len(names)], names[(i + offset) % len(names)]
            y, x = _position(g, resolution)
            self.items.append((_square(name, y, x, resolution), _square(wrong, y, x, resolution), f"a {name} square"))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from spoxl.models.text import make_time_ids

        pixels_w, pixels_l, caption = self.items[i]
        r = self.resolution
        return {"pixels_w": pixels_w, "pixels_l": pixels_l, "caption": caption,
                "time_ids": make_time_ids(1, (r, r))[0], "index": i}

    def cache_key(self, i: int) -> str:
        pixels_w, pixels_l, caption = self.items[i]
        return _digest(pixels_w, pixels_l, text="pair|" + caption)


def pair_dataset(cfg):
    """The preference pairs of a recipe: data.path (.jsonl / .parquet, Pick-a-Pic layout), or the
    built-in synthetic pairs when it is null."""
    d = cfg.data
    if d.path is None:
        return SyntheticPairDataset(d.synthetic_size, d.resolution, cfg.run.seed)
    from spoxl.data import build_dataset

    return build_dataset("pairs", d.path, d.resolution, crop=d.crop, hflip=d.hflip, seed=cfg.run.seed,
                         drop_ties=d.ties == "drop", image_0_column=d.image_0_column,
                         image_1_column=d.image_1_column, label_column=d.label_column,
                         caption_column=d.caption_column or "caption")


class OfflineObjective(Objective):
    """An objective that walks a fixed dataset. Subclasses implement build_dataset(cfg) and loss."""

    def __init__(self, config=None, recipe=None):
        super().__init__(config, recipe)
        self.epoch = 0
        self.index = 0  # micro-batches consumed in this epoch on this rank
        self.dataset = None

    def build_dataset(self, cfg):
        raise NotImplementedError

    def check(self, config) -> None:
        self.dataset = self.build_dataset(config)  # opening it checks the path, columns, captions

    def setup(self, run: RunView) -> None:
        recipe = self.recipe
        if self.dataset is None:
            self.dataset = self.build_dataset(recipe)
        if recipe.data.cache_dir:
            from spoxl.data.cache import CachedDataset

            # Every rank encodes its share of the missing entries, then all meet at a barrier.
            self.dataset = CachedDataset(self.dataset, run.components, recipe.data.cache_dir)
            encoded = self.dataset.build(run.rank, run.world_size,
                                         progress=run.rank == 0 and recipe.logging.progress)
            run.info(f"latent/text cache {recipe.data.cache_dir}: {encoded} item(s) encoded on rank 0")
        n, mb = len(self.dataset), recipe.train.micro_batch_size
        per_rank = n // run.world_size
        if per_rank < mb:
            raise SpoxlError(f"dataset has {n} samples: too few for {run.world_size} rank(s) x "
                             f"micro_batch_size {mb}")
        self.batches_per_epoch = per_rank // mb

    def _order(self, run: RunView, epoch: int) -> torch.Tensor:
        n = len(self.dataset)
        if self.recipe.data.shuffle:
            order = torch.randperm(n, generator=rng.generator(rng.DATA_ORDER, self.recipe.run.seed, counter=epoch))
        else:
            order = torch.arange(n)
        per_rank = n // run.world_size  # every rank gets the same count (ZeRO-3: same number of forwards)
        return order[run.rank * per_rank:(run.rank + 1) * per_rank]

    def micro_batches(self, run: RunView):
        mb = self.recipe.train.micro_batch_size
        while True:
            order = self._order(run, self.epoch)
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

    @property
    def noise(self) -> "NoiseSpec":
        """How this objective draws its noise (its fixed_noise, the recipe's seed and caption dropout)."""
        return NoiseSpec(seed=self.recipe.run.seed, fixed_noise=self.config.fixed_noise,
                         caption_dropout=self.recipe.data.caption_dropout)  # fmt: skip


@dataclass(frozen=True)
class NoiseSpec:
    """What encode_and_noise needs to know of the recipe: the run seed (for fixed_noise), whether
    to restart the stream at every call, and the share of captions to drop."""

    seed: int
    fixed_noise: bool = False
    caption_dropout: float = 0.0


def encode_and_noise(run: RunView, batch: dict, spec: NoiseSpec, latents_key: str = "latents",
                     min_timestep: int = 0, posterior_noise: bool = False):
    """(encoded batch, noise, t, alpha_bar(t)) for a micro-batch; noise has the shape of
    batch[latents_key] and t one entry per sample. Pair objectives pass "latents_w" and use the
    same noise and t for the loser (the pair shares them, methods.md 2.1 / 3.1).

    One generator stream, in this order: VAE sample, noise, timesteps. spec.fixed_noise restarts
    it from the same seed at every call, so a fixed batch gives a deterministic loss (the "overfit
    one batch" check).

    NCP only (defaults leave SFT/DPO/MaPO unchanged): min_timestep draws t ~ U{min_timestep..T-1}
    (NCP steps to t-1, so it needs t >= 1); posterior_noise draws one more N(0, I) tensor z of the
    noise's shape after the timesteps and returns (batch, noise, t, a, z).
    """
    from spoxl.data.cache import maybe_encode

    gen = run.generator
    if spec.fixed_noise:
        gen = rng.generator(rng.RANK_STREAM, spec.seed, rank=run.rank, device=run.device)
    # Latents + text embeddings (read from the cache when data.cache_dir is set). The VAE
    # sample noise is drawn on the CPU: from `gen` on CPU runs; on GPUs from the (checkpointed)
    # global CPU RNG, or a fixed CPU generator in fixed_noise mode.
    vae_gen = gen
    if gen.device.type != "cpu":
        vae_gen = rng.generator(rng.RANK_STREAM, spec.seed, rank=run.rank) if spec.fixed_noise else None
    batch = maybe_encode(run.components, batch, generator=vae_gen)
    shape = batch[latents_key].shape
    scheduler = run.components.scheduler
    noise = torch.randn(shape, generator=gen, device=run.device)
    t = torch.randint(min_timestep, scheduler.config.num_train_timesteps, (shape[0],), generator=gen, device=run.device)
    a = alpha_bar(scheduler, t.cpu()).to(run.device)
    z = torch.randn(shape, generator=gen, device=run.device) if posterior_noise else None
    if spec.caption_dropout > 0:  # drawn last: the stream above is the same with or without
        drop = torch.rand(shape[0], generator=gen, device=run.device) < spec.caption_dropout
        batch = drop_captions(run, batch, drop)
    return (batch, noise, t, a, z) if posterior_noise else (batch, noise, t, a)


# text encoder -> the empty caption's (embeds, pooled); weak keys: a model freed is forgotten, and
# a new one (even at a recycled id) is encoded afresh
_EMPTY_CAPTION = weakref.WeakKeyDictionary()


def drop_captions(run: RunView, batch: dict, drop: torch.Tensor) -> dict:
    """The batch with the text embeddings of the rows in `drop` replaced by those of the empty
    caption "" (encoded once per model, as the official scripts encode ""), everything else kept."""
    from spoxl.models.text import encode_prompts

    key = run.components.text_encoder
    if key not in _EMPTY_CAPTION:
        with torch.no_grad():
            empty = encode_prompts(run.components, [""])
        _EMPTY_CAPTION[key] = (empty.embeds, empty.pooled)
    embeds, pooled = _EMPTY_CAPTION[key]
    out = dict(batch)
    pe, pp = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    keep = ~drop.to(pe.device)
    out["prompt_embeds"] = torch.where(keep[:, None, None], pe, embeds.to(pe.device, pe.dtype))
    out["pooled_prompt_embeds"] = torch.where(keep[:, None], pp, pooled.to(pp.device, pp.dtype))
    return out


def stacked_pair_inputs(run: RunView, batch: dict, spec: NoiseSpec):
    """UNet inputs and targets for a batch of B preference pairs, stacked winners first: [w; l].

    (x_t, t, prompt_embeds, pooled, time_ids, target), each with 2B rows. w and l share one noise
    and one timestep per pair (methods.md 2.1 / 3.1), and their caption and time_ids, so ONE UNet
    call on the stack gives both predictions (and, for DPO, one more for the reference).
    """
    batch, noise, t, a = encode_and_noise(run, batch, spec, latents_key="latents_w")
    x0 = torch.cat([batch["latents_w"], batch["latents_l"]]).to(run.device, torch.float32)
    two = lambda v: torch.cat([v, v])  # noqa: E731  (the same value for w and l)
    noise, t, a = two(noise), two(t), two(a)
    x_t = add_noise(x0, noise, a)
    target = training_target(x0, noise, a, run.prediction_type)
    return x_t, t, two(batch["prompt_embeds"]), two(batch["pooled_prompt_embeds"]), two(batch["time_ids"]), target


def finite_number(where: str, value, *, minimum: float = 0.0, strict: bool = True) -> None:
    """One-line SpoxlError unless value is a finite number > minimum (>= minimum when not strict)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        raise SpoxlError(f"config: {where} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}")
