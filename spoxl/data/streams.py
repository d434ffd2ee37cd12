"""Where training batches come from: streams with one interface, for exact resume.

A stream is an iterator of micro-batches with `state_dict()` / `load_state_dict()`: the state says
exactly where the NEXT micro-batch comes from, so that a checkpoint taken between two micro-batches
and restored gives the same batches as the uninterrupted run. Every rank's stream yields the same
number of micro-batches (ZeRO-3: every rank runs every forward).

  DatasetStream    walks a map-style dataset (preference pairs, image-caption pairs): each epoch a
                   permutation (spoxl.rng.DATA_ORDER, the same on every rank; or the identity when
                   not shuffled), each rank its own equal-sized slice, collated into micro-batches;
                   the position is (epoch, index)
  pair_dataset / caption_dataset
                   the recipe's data: data.path (Pick-a-Pic pairs; an image-caption folder or table),
                   or the built-in synthetic sets (spoxl.data.synthetic) when it is null
  open_dataset     a dataset behind the latent/text cache when data.cache_dir is set (every rank
                   encodes its share of the missing entries, then all meet)

The SPO rollout stream (prompts -> pool sampler -> pairs -> all-gather/deal -> buffer) has the same
interface: spoxl.spo.rollout.RolloutStream.
"""

from __future__ import annotations

from typing import Iterator, Protocol

import torch

from spoxl import rng
from spoxl.errors import SpoxlError


class Stream(Protocol):
    def __iter__(self) -> Iterator: ...

    def __next__(self): ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class DatasetStream:
    """Micro-batches of `micro_batch_size` items from this rank's share of each epoch."""

    def __init__(self, dataset, *, rank: int, world_size: int, micro_batch_size: int, seed: int, shuffle: bool = True):
        n = len(dataset)
        self.per_rank = n // world_size  # every rank gets the same count (ZeRO-3: same number of forwards)
        if self.per_rank < micro_batch_size:
            raise SpoxlError(f"dataset has {n} samples: too few for {world_size} rank(s) x micro_batch_size {micro_batch_size}")
        self.dataset, self.rank, self.micro_batch_size = dataset, rank, micro_batch_size
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = self.per_rank // micro_batch_size
        self.epoch = 0
        self.index = 0  # micro-batches consumed in this epoch on this rank
        self._order = None  # (epoch, this rank's indices)

    def _rank_order(self) -> torch.Tensor:
        if self._order is None or self._order[0] != self.epoch:
            n = len(self.dataset)
            order = (torch.randperm(n, generator=rng.generator(rng.DATA_ORDER, self.seed, counter=self.epoch))
                     if self.shuffle else torch.arange(n))  # fmt: skip
            self._order = (self.epoch, order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank])
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
        return self._order[1]

    def __iter__(self):
        return self

    def __next__(self):
        if self.index >= self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
        order = self._rank_order()
        mb = self.micro_batch_size
        idx = order[self.index * mb:(self.index + 1) * mb].tolist()
        self.index += 1
        return torch.utils.data.default_collate([self.dataset[i] for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def pair_dataset(recipe):
    """The preference pairs of a recipe: data.path (.jsonl / .parquet, Pick-a-Pic layout), or the
    built-in synthetic pairs when it is null."""
    d = recipe.data
    if d.path is None:
        from spoxl.data.synthetic import SyntheticPairDataset

        return SyntheticPairDataset(d.synthetic_size, d.resolution, recipe.run.seed)
    from spoxl.data import build_dataset

    return build_dataset("pairs", d.path, d.resolution, crop=d.crop, hflip=d.hflip, seed=recipe.run.seed,
                         drop_ties=d.ties == "drop", image_0_column=d.image_0_column,
                         image_1_column=d.image_1_column, label_column=d.label_column,
                         caption_column=d.caption_column or "caption")


def caption_dataset(recipe):
    """The image-caption pairs of a recipe (SFT): data.path (a folder or a table), or the built-in
    synthetic squares when it is null."""
    d = recipe.data
    if d.path is None:
        from spoxl.data.synthetic import SyntheticCaptionDataset

        return SyntheticCaptionDataset(d.synthetic_size, d.resolution, recipe.run.seed)
    from spoxl.data.captions import ImageCaptionDataset

    return ImageCaptionDataset(d.path, d.resolution, crop=d.crop, hflip=d.hflip, seed=recipe.run.seed,
                               image_column=d.image_column, caption_column=d.caption_column)


RECIPE_DATASETS = {"pairs": pair_dataset, "captions": caption_dataset}


def open_dataset(dataset, recipe, components, *, rank: int, world_size: int, info=print):
    """`dataset` behind the latent/text cache when the recipe's data.cache_dir is set."""
    if not recipe.data.cache_dir:
        return dataset
    from spoxl.data.cache import CachedDataset

    cached = CachedDataset(dataset, components, recipe.data.cache_dir)
    encoded = cached.build(rank, world_size, progress=rank == 0 and recipe.logging.progress)
    info(f"latent/text cache {recipe.data.cache_dir}: {encoded} item(s) encoded on rank 0")
    return cached
