"""ZeRO-3: the UNet partitioned from the moment it is built, its weights loaded into the partitions.

Without this, every rank builds the whole UNet (2.6 G parameters for SDXL: 10.3 GB in fp32) before
deepspeed.initialize shards it: a node of 8 ranks doing full fine-tuning with a frozen reference
materialises 16 full copies first. Here the UNet is constructed inside `deepspeed.zero.Init`, so
each parameter is partitioned as soon as its module is built (a rank holds its 1/N share plus the
one module being built), and the checkpoint's tensors are then copied in one module at a time:
the module's parameters gathered (`GatheredParameters`, modifier rank 0), rank 0 copies what it
reads lazily from the safetensors file(s), and leaving the block re-partitions them. Peak memory
per rank: its share of the model plus the largest module's parameters plus one tensor.

  build_sharded_unet(config, ds, *, weights=None, seed=0) -> (unet, LoadStats)
      config: the UNet's diffusers config dict; weights: a diffusers unet/ folder (safetensors,
      plain, variant or sharded) or None to keep the seeded random initialisation (the tiny model,
      and the real-size benchmark without a checkpoint)
  load_components_sharded(cfg, ds) -> (components, build): the frozen parts loaded as usual, the
      UNet built as above from the recipe's model (a folder, "toy", "tiny[:SEED]", "tiny-sd15");
      `build()` builds another such UNet (full fine-tuning's frozen reference)

Single-file UNet checkpoints (model.unet_file) keep the unsharded path (spoxl.engine.setup).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from spoxl.errors import SpoxlError


@dataclass
class LoadStats:
    tensors: int = 0  # checkpoint tensors copied into the partitions
    max_gathered: int = 0  # the most parameter elements materialised at once while loading


def weight_files(unet_dir: Path, variant: str | None) -> dict[str, Path]:
    """tensor name -> the .safetensors file holding it, for a diffusers unet/ folder (one file, or
    shards with their index); .bin weights cannot be read lazily and are refused."""
    from spoxl.models.loading import choose_variant

    chosen = choose_variant(unet_dir, variant)
    suffix = f".{chosen}" if chosen else ""
    single = unet_dir / f"diffusion_pytorch_model{suffix}.safetensors"
    index = unet_dir / f"diffusion_pytorch_model.safetensors.index{suffix}.json"
    if not index.is_file():
        index = unet_dir / f"diffusion_pytorch_model{suffix}.safetensors.index.json"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys()}
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise SpoxlError(f"{index} is not a safetensors shard index: {e}") from None
        return {k: unet_dir / name for k, name in mapping.items()}
    raise SpoxlError(f"ZeRO-3 loads the UNet into its partitions from .safetensors weights; {unet_dir} has none "
                     f"(convert the .bin weights with diffusers' save_pretrained(safe_serialization=True))")


def build_sharded_unet(config: dict, ds: dict, *, weights: Path | None = None, variant: str | None = None,
                       seed: int = 0):  # fmt: skip
    """(UNet2DConditionModel built under deepspeed.zero.Init, LoadStats); see the module docstring."""
    import deepspeed
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with deepspeed.zero.Init(config_dict_or_path=ds):
            unet = UNet2DConditionModel(**config)
    stats = LoadStats()
    if weights is not None:
        _load_into_partitions(unet, weight_files(Path(weights), variant), stats)
    return unet.eval(), stats


def _check_shapes(unet, files: dict[str, Path]) -> dict[str, torch.nn.Parameter]:
    """Every rank checks the checkpoint against the config from the files' headers (no tensor is
    read), so a mismatch is the same one-line error on every rank, before any collective."""
    from safetensors import safe_open

    expected = dict(unet.named_parameters())
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected) - set(dict(unet.named_buffers())))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise SpoxlError(f"UNet checkpoint does not match the UNet config: {'missing' if missing else 'unexpected'} "
                         f"tensor {key} ({len(missing)} missing, {len(unexpected)} unexpected)")
    by_file: dict[Path, list[str]] = {}
    for key in expected:
        by_file.setdefault(files[key], []).append(key)
    for path, keys in by_file.items():
        with safe_open(str(path), "pt") as f:
            for key in keys:
                shape = tuple(f.get_slice(key).get_shape())
                full = tuple(getattr(expected[key], "ds_shape", expected[key].shape))
                if shape != full:
                    raise SpoxlError(f"UNet checkpoint tensor {key} has shape {shape}, the config's UNet {full}")
    return expected


def _load_into_partitions(unet, files: dict[str, Path], stats: LoadStats) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    expected = _check_shapes(unet, files)
    name_of = {id(p): n for n, p in expected.items()}
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    handles: dict[Path, object] = {}
    for module in unet.modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            stats.max_gathered = max(stats.max_gathered, sum(p.numel() for p in params))
            if rank0:  # the others receive rank 0's values when the block re-partitions them
                for p in params:
                    key = name_of[id(p)]
                    if files[key] not in handles:
                        handles[files[key]] = safe_open(str(files[key]), "pt")
                    with torch.no_grad():
                        p.copy_(handles[files[key]].get_tensor(key).to(p.dtype))
                    stats.tensors += 1
    handles.clear()


def unet_source(model: str) -> tuple[dict, Path | None, int]:
    """(UNet config, unet/ weights folder or None, init seed) of a recipe's model.path."""
    from spoxl.models import random_sdxl, tiny
    from spoxl.models.loading import BUILT_IN, built_in_model, check_sdxl_folder, resolve_model_path

    if str(model).split(":", 1)[0] in BUILT_IN:
        name, seed = built_in_model(model)
        # the factories build the UNet first after seeding: the same init here
        config = {"tiny": tiny.tiny_unet_config, "tiny-sd15": tiny.tiny_sd15_unet_config,
                  "sdxl-random": lambda: random_sdxl.bundled_config("unet")}[name]()  # fmt: skip
        return config, None, seed
    folder = Path(resolve_model_path(model)).expanduser()
    check_sdxl_folder(folder)
    try:
        config = json.loads((folder / "unet" / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise SpoxlError(f"{folder / 'unet' / 'config.json'} is not a readable UNet config: {e}") from None
    return config, folder / "unet", 0


def load_components_sharded(cfg, ds):
    """The recipe's components with the UNet partitioned from construction (ZeRO-3)."""
    from spoxl.models.loading import load_sdxl

    from spoxl.engine.ds_config import compute_dtype

    m = cfg.model
    # The frozen parts in the compute dtype right away (the VAE as model.vae_dtype says), and the
    # freed fp32 copies handed back to the OS before the UNet is built: at real size the text
    # encoders alone are 3.3 GB in fp32.
    components = load_sdxl(m.path, vae_file=m.vae_file, variant=m.variant, vae_path=m.vae_path, with_unet=False)
    dtype = compute_dtype(cfg.deepspeed.precision)
    for name in components.frozen_part_names():
        if name != "vae" or m.vae_dtype != "fp32":  # the same casts as spoxl.engine.setup, done early
            getattr(components, name).to(dtype)
    release_freed_memory()
    config, weights, seed = unet_source(m.path)

    def build():
        unet, _ = build_sharded_unet(config, ds, weights=weights, variant=m.variant, seed=seed)
        release_freed_memory()
        return unet

    components.unet = build()
    return components, build


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (glibc's malloc_trim; a no-op elsewhere). Building a large
    model frees GBs of temporaries that glibc would otherwise keep mapped, and that the next
    allocation spike (deepspeed.initialize, the first forward) then adds to."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
