"""VAE latents and text embeddings: encode a batch, or cache them on disk so later runs skip it.

API
  encode_batch(components, batch, generator=None) -> dict
      turns a (collated) dataset batch into model inputs: every "pixels*" tensor becomes the
      matching "latents*" ([B, 4, R/8, R/8], VAE-scaled), "caption" (list of str) becomes
      "prompt_embeds" [B, 77, D] and "pooled_prompt_embeds" [B, P] (spoxl.models.text);
      time_ids and the other fields pass through. Same output keys as a cached batch, so an
      objective can always call `batch = maybe_encode(components, batch)`.
  maybe_encode(components, batch, generator=None) -> batch unchanged if it is already encoded
  CachedDataset(dataset, components, cache_dir, batch_size=8, storage_dtype=torch.float16,
                model_id=None)
      .build(rank=0, world_size=1) -> number of items encoded now (0 on a warm cache); every rank
          encodes its round-robin share of the missing items, then all ranks meet at a barrier
      .set_epoch(e) does nothing: an item's crop/flip is the one drawn when it was cached
      [i] -> the encoded item (latents*, prompt_embeds, pooled_prompt_embeds, time_ids, caption,
          ...) read from disk as float32; a missing entry is encoded on the spot and stored
  model_fingerprint(components) -> hex id of the VAE + text encoders (configs + weights)

Where entries live: CACHE_DIR/<model fingerprint[:16]>/<key[:2]>/<key>.safetensors, `key` being
the dataset's cache_key(i): a hash of the image source (bytes, or path+size+mtime), caption and
preprocessing (resolution, crop, flip; the per-item draw when random). A new VAE, new text
encoders, another resolution or an edited image gives a new entry; stale entries are never read.
Files are written to a temporary name and renamed, so a killed run never leaves a torn entry.

VAE sampling: each item's latent is mean + std * noise with noise from a generator seeded by
the item's key, so the cached latent does not depend on batch composition or rank count.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset, default_collate

from spoxl.errors import SpoxlError

TENSOR_FIELDS_FROM_DATASET = ("time_ids", "original_size", "crop_top_left")
PIXEL_PREFIX = "pixels"
LATENT_PREFIX = "latents"


def _latent_key(pixel_key: str) -> str:
    return LATENT_PREFIX + pixel_key[len(PIXEL_PREFIX) :]


@torch.no_grad()
def _vae_latents(vae, pixels: torch.Tensor, generators: list[torch.Generator] | None, generator=None):
    """Scaled latent samples; per-item generators make each item's noise independent of its batch."""
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    dist = vae.encode(pixels.to(device, dtype)).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    if generators is None:
        noise = torch.randn(mean.shape, generator=generator, device="cpu").to(mean.device)
    else:
        noise = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators]).to(mean.device)
    return (mean + std * noise) * vae.config.scaling_factor


@torch.no_grad()
def encode_batch(components, batch: dict, generator=None, item_generators=None) -> dict:
    from spoxl.models.text import encode_prompts

    out = {k: v for k, v in batch.items() if not k.startswith(PIXEL_PREFIX)}
    for key, pixels in batch.items():
        if key.startswith(PIXEL_PREFIX):
            out[_latent_key(key)] = _vae_latents(components.vae, pixels, item_generators, generator)
    captions = batch["caption"]
    prompt = encode_prompts(components, list(captions))
    out["prompt_embeds"] = prompt.embeds.float()
    out["pooled_prompt_embeds"] = prompt.pooled.float()
    return out


def maybe_encode(components, batch: dict, generator=None) -> dict:
    if "prompt_embeds" in batch:
        return batch
    return encode_batch(components, batch, generator)


def model_fingerprint(components) -> str:
    """Identity of the encoders: configs plus a cheap digest of every weight (sum, first values)."""
    h = hashlib.sha256()
    for name in components.frozen_part_names():
        part = getattr(components, name)
        config = part.config.to_dict() if hasattr(part.config, "to_dict") else dict(part.config)
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        for pname, p in part.named_parameters():
            flat = p.detach().reshape(-1)
            h.update(f"{name}.{pname}{tuple(p.shape)}{p.dtype}".encode())
            h.update(flat.double().sum().cpu().numpy().tobytes())
            h.update(flat[:8].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _key_seed(key: str) -> int:
    return int(key[:15], 16)


class CachedDataset(Dataset):
    def __init__(
        self,
        dataset,
        components,
        cache_dir,
        batch_size: int = 8,
        storage_dtype: torch.dtype = torch.float16,
        model_id: str | None = None,
    ):
        if not hasattr(dataset, "cache_key"):
            raise TypeError("CachedDataset needs a dataset with cache_key(i)")
        self.dataset = dataset
        self.components = components
        self.batch_size = int(batch_size)
        self.storage_dtype = storage_dtype
        self.model_id = model_id or model_fingerprint(components)
        self.root = Path(cache_dir).expanduser() / self.model_id[:16]
        self.encoded = 0  # items encoded by this process (build + on-the-spot misses)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """No-op on purpose: a cache fixes each item's crop/flip draw (that of epoch 0), so
        training from a cache sees the same augmentation every epoch and never re-encodes."""

    def entry_path(self, i: int) -> Path:
        key = self.dataset.cache_key(i)
        return self.root / key[:2] / f"{key}.safetensors"

    def _encode_and_store(self, indices: list[int]) -> None:
        from safetensors.torch import save_file

        items = [self.dataset[i] for i in indices]
        paths = [self.entry_path(i) for i in indices]
        gens = [torch.Generator().manual_seed(_key_seed(p.stem)) for p in paths]
        encoded = encode_batch(self.components, default_collate(items), item_generators=gens)
        for j, path in enumerate(paths):
            tensors = {
                k: v[j].detach().to("cpu")
                for k, v in encoded.items()
                if torch.is_tensor(v) and k not in ("index", "tie")  # kept as metadata / re-derived
            }
            tensors = {k: (v.to(self.storage_dtype) if v.is_floating_point() and k != "time_ids" else v).contiguous() for k, v in tensors.items()}
            meta = {"caption": items[j]["caption"]}
            if "tie" in items[j]:
                meta["tie"] = str(bool(items[j]["tie"]))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            save_file(tensors, str(tmp), metadata=meta)
            os.replace(tmp, path)
        self.encoded += len(indices)

    def build(self, rank: int = 0, world_size: int = 1, progress: bool = False) -> int:
        """Encode every missing entry of this rank's share; returns how many were encoded."""
        import torch.distributed as dist
        from tqdm.auto import tqdm

        mine = [i for i in range(rank, len(self), world_size) if not self.entry_path(i).is_file()]
        done = 0
        # A bar on the calling rank while anything is missing (the first run over a large set takes minutes).
        bar = tqdm(total=len(mine), desc=f"latent cache (rank {rank})", unit="item",
                   disable=not progress or not mine, dynamic_ncols=True)
        for start in range(0, len(mine), self.batch_size):
            chunk = mine[start : start + self.batch_size]
            self._encode_and_store(chunk)
            done += len(chunk)
            bar.update(len(chunk))
        bar.close()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # other ranks read this rank's entries next
        return done

    def __getitem__(self, i: int) -> dict:
        from safetensors import safe_open

        path = self.entry_path(i)
        if not path.is_file():
            self._encode_and_store([i])
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                item = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise SpoxlError(f"cache entry {path} is unreadable ({str(e).splitlines()[0]}); delete it to re-encode") from None
        item = {k: (v.float() if v.is_floating_point() else v) for k, v in item.items()}
        item["caption"] = meta.get("caption", "")
        if "tie" in meta:
            item["tie"] = meta["tie"] == "True"
        item["index"] = i
        return item
