"""Datasets, prompt sets and the latent/embedding cache (see docs/data_and_export.md).

  spoxl.data.captions   ImageCaptionDataset: folder of images + .txt, or .jsonl / .parquet (SFT)
  spoxl.data.pairs      PreferencePairDataset: Pick-a-Pic layout jpg_0/jpg_1/label_0/caption
  spoxl.data.prompts    load_prompts (.txt / .json / .jsonl), shard_prompts (SPO)
  spoxl.data.cache      encode_batch / maybe_encode, CachedDataset (VAE latents + text embeds)
  spoxl.data.images     decoding and SDXL preprocessing (resize, crop, flip, time_ids)
  spoxl.data.synthetic  coloured-shape datasets for tests and demos
  spoxl.data.build_dataset(kind, path, ...) one entry point for configs

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
