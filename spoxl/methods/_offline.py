"""What the offline objectives (SFT, Diffusion-DPO, MaPO, NCP) share: their data, and drawing the
noise and timesteps of a denoising loss.

  OfflineObjective      its micro-batches are a spoxl.data.streams.DatasetStream over the recipe's
                        pairs or captions (behind the latent/text cache when data.cache_dir is
                        set); the stream's (epoch, index) is the objective's state. Subclasses set
                        data_kind and define loss.
  encode_and_noise      latents + text embeddings of a batch, then noise ~ N(0, I), t ~ U{0..T-1}
                        and alpha_bar(t), all from one generator stream (fixed_noise-aware).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

from spoxl import rng
from spoxl.data.streams import RECIPE_DATASETS, DatasetStream, open_dataset
from spoxl.engine.view import RunView
from spoxl.errors import SpoxlError
from spoxl.methods.base import Objective
from spoxl.sampling import add_noise, alpha_bar, training_target

class OfflineObjective(Objective):
    """An objective that walks a fixed dataset (a spoxl.data.streams.DatasetStream over the recipe's
    pairs or captions). Subclasses set `data_kind` and implement loss."""

    data_kind = "pairs"  # spoxl.data.streams.RECIPE_DATASETS: "pairs" or "captions"

    @classmethod
    def micro_step_unet_batch(cls, recipe) -> tuple[int, int | None]:
        return (2 if cls.data_kind == "pairs" else 1), recipe.data.resolution  # a pair: winner + loser rows

    def __init__(self, config=None, recipe=None):
        super().__init__(config, recipe)
        self.dataset = None
        self.stream = None
        self._position = {"epoch": 0, "index": 0}  # until setup() has built the stream

    def build_dataset(self, recipe):
        return RECIPE_DATASETS[self.data_kind](recipe)

    def check(self, recipe) -> None:
        self.dataset = self.build_dataset(recipe)  # opening it checks the path, columns, captions

    def setup(self, run: RunView) -> None:
        recipe = self.recipe
        if self.dataset is None:
            self.dataset = self.build_dataset(recipe)
        self.dataset = open_dataset(self.dataset, recipe, run.components, rank=run.rank, world_size=run.world_size,
                                    info=run.info)  # fmt: skip
        self.stream = DatasetStream(self.dataset, rank=run.rank, world_size=run.world_size,
                                    micro_batch_size=recipe.train.micro_batch_size, seed=recipe.run.seed,
                                    shuffle=recipe.data.shuffle)  # fmt: skip
        self.stream.load_state_dict(self._position)

    def micro_batches(self, run: RunView):
        return self.stream

    def state_dict(self) -> dict:
        return self.stream.state_dict() if self.stream is not None else dict(self._position)

    def load_state_dict(self, state: dict) -> None:
        if self.stream is not None:
            self.stream.load_state_dict(state)
        else:
            self._position = {"epoch": int(state["epoch"]), "index": int(state["index"])}

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
