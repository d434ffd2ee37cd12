"""Datasets, prompt sets and the latent/embedding cache (see docs/data_and_export.md).

  spoxl.data.captions   ImageCaptionDataset: folder of images + .txt, or .jsonl / .parquet (SFT)
  spoxl.data.pairs      PreferencePairDataset: Pick-a-Pic layout jpg_0/jpg_1/label_0/caption
  spoxl.data.prompts    load_prompts (.txt / .json / .jsonl), shard_prompts (SPO)
  spoxl.data.cache      encode_batch / maybe_encode, CachedDataset (VAE latents + text embeds)
  spoxl.data.images     decoding and SDXL preprocessing (resize, crop, flip, time_ids)
  spoxl.data.synthetic  coloured-shape datasets for tests and demos
  spoxl.data.build_dataset(kind, path, resolution, **kw)   one entry point by kind
  spoxl.data.dataset_from_config(data_cfg, kind, seed, components, rank, world_size)
      the same from spoxl.config.DataConfig, wrapped in a CachedDataset (built collectively)
      when data_cfg.cache_dir is set; batches then carry latents + embeddings, and
      spoxl.data.cache.maybe_encode(components, batch) makes both kinds of batch look alike

Importing this package is cheap; heavy libraries load when a dataset is built.
"""

from __future__ import annotations


def build_dataset(kind: str, path, resolution: int, **kwargs):
    """kind: "captions" (SFT) or "pairs" (DPO / MaPO / NCP); kwargs go to the dataset class."""
    from spoxl.errors import SpoxlError

    if kind == "captions":
        from spoxl.data.captions import ImageCaptionDataset

        return ImageCaptionDataset(path, resolution, **kwargs)
    if kind == "pairs":
        from spoxl.data.pairs import PreferencePairDataset

        return PreferencePairDataset(path, resolution, **kwargs)
    raise SpoxlError(f"unknown dataset kind {kind!r} (captions or pairs)")


def dataset_from_config(data_cfg, kind: str = "captions", seed: int = 0, components=None, rank: int = 0,
                        world_size: int = 1):
    """A dataset from a spoxl.config.DataConfig (path, resolution, crop, hflip, columns, cache_dir).

    With cache_dir set, every rank must call this (the cache build ends with a barrier) and
    `components` (VAE + text encoders) must be given.
    """
    from spoxl.errors import SpoxlError

    if data_cfg.path is None:
        raise SpoxlError("data.path is not set")
    kwargs = dict(crop=data_cfg.crop, hflip=data_cfg.hflip, seed=seed)
    if kind == "captions":
        kwargs.update(image_column=data_cfg.image_column, caption_column=data_cfg.caption_column)
    dataset = build_dataset(kind, data_cfg.path, data_cfg.resolution, **kwargs)
    if getattr(data_cfg, "cache_dir", None):
        from spoxl.data.cache import CachedDataset

        if components is None:
            raise ValueError("dataset_from_config: a cache needs the components (VAE, text encoders)")
        dataset = CachedDataset(dataset, components, data_cfg.cache_dir)
        dataset.build(rank, world_size)
    return dataset
