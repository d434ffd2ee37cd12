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
      UNet built as above from the recipe's model (a folder, "toy", "tiny[:SEED]", "tiny-sd15",
      "sdxl-random", "sdxl-narrow") or its model.unet_file;
      `build()` builds another such UNet (full fine-tuning's frozen reference)

A single-file UNet (model.unet_file: diffusers-keyed, or the original LDM layout of A1111 / ComfyUI /
sd-scripts checkpoints) is loaded the same way: its keys are mapped to the UNet's names by
diffusers' converter run on meta stand-ins (single_file_sources), then read lazily.
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


Source = tuple[Path, str]  # (.safetensors file, the tensor's key in it)


def weight_files(unet_dir: Path, variant: str | None) -> dict[str, Source]:
    """parameter name -> (the .safetensors file holding it, its key there), for a diffusers unet/
    folder (one file, or shards with their index); .bin weights cannot be read lazily and are refused."""
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
            return {k: (single, k) for k in f.keys()}
    if index.is_file():
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise SpoxlError(f"{index} is not a safetensors shard index: {e}") from None
        return {k: (unet_dir / name, k) for k, name in mapping.items()}
    raise SpoxlError(f"ZeRO-3 loads the UNet into its partitions from .safetensors weights; {unet_dir} has none "
                     f"(convert the .bin weights with diffusers' save_pretrained(safe_serialization=True))")


def single_file_sources(file: Path, unet) -> dict[str, Source]:
    """parameter name -> (file, key) for a single-file UNet checkpoint: diffusers-keyed, or the
    original (A1111 / ComfyUI / sd-scripts) layout whose `model.diffusion_model.*` keys diffusers'
    own converter renames. The converter runs on META tensors standing for the file's (shapes from
    its header, nothing read), and each converted tensor is traced back to the key it came from by
    identity: a conversion that transforms a tensor instead of renaming it has no such key and is
    refused (convert that file to a diffusers folder once)."""
    from safetensors import safe_open

    from spoxl.models.loading import _check_file

    _check_file(file, "unet")
    try:
        with safe_open(str(file), "pt") as f:
            stand_ins = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise SpoxlError(f"could not load unet checkpoint {file}: {str(e).splitlines()[0]}") from None
    names = set(dict(unet.named_parameters())) | set(dict(unet.named_buffers()))
    if names <= set(stand_ins):  # already diffusers-keyed
        return {k: (file, k) for k in stand_ins}
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    key_of = {id(t): k for k, t in stand_ins.items()}
    foreign = f"unet checkpoint {file} is neither diffusers- nor LDM-keyed for this UNet config"
    try:
        converted = convert_ldm_unet_checkpoint(dict(stand_ins), dict(unet.config))
    except Exception as e:  # the converter raises KeyError/IndexError/... on a foreign layout
        raise SpoxlError(f"{foreign} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else e!r})") from None
    if not converted:
        raise SpoxlError(f"{foreign} (no model.diffusion_model.* tensors)")
    sources = {}
    for name, t in converted.items():
        if id(t) not in key_of:
            raise SpoxlError(f"unet checkpoint {file}: {name} is computed from the file's tensors, not stored in it; "
                             f"ZeRO-3 cannot load it into partitions (save it as a diffusers folder first)")
        sources[name] = (file, key_of[id(t)])
    return sources


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
        weights = Path(weights)
        single = weights.suffix == ".safetensors"  # a file; a unet/ folder otherwise
        sources = single_file_sources(weights, unet) if single else weight_files(weights, variant)
        _load_into_partitions(unet, sources, stats)
    return unet.eval(), stats


def _check_shapes(unet, sources: dict[str, Source]) -> dict[str, torch.nn.Parameter]:
    """Every rank checks the checkpoint against the config from the files' headers (no tensor is
    read), so a mismatch is the same one-line error on every rank, before any collective."""
    from safetensors import safe_open

    expected = dict(unet.named_parameters())
    missing = sorted(set(expected) - set(sources))
    unexpected = sorted(set(sources) - set(expected) - set(dict(unet.named_buffers())))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise SpoxlError(f"UNet checkpoint does not match the UNet config: {'missing' if missing else 'unexpected'} "
                         f"tensor {key} ({len(missing)} missing, {len(unexpected)} unexpected)")
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(sources[name][0], []).append(name)
    for path, names in by_file.items():
        with safe_open(str(path), "pt") as f:
            for name in names:
                shape = tuple(f.get_slice(sources[name][1]).get_shape())
                full = tuple(getattr(expected[name], "ds_shape", expected[name].shape))
                if shape != full:
                    raise SpoxlError(f"UNet checkpoint tensor {name} has shape {shape}, the config's UNet {full}")
    return expected


def _load_into_partitions(unet, sources: dict[str, Source], stats: LoadStats) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors import safe_open

    expected = _check_shapes(unet, sources)
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
                    path, key = sources[name_of[id(p)]]
                    if path not in handles:
                        handles[path] = safe_open(str(path), "pt")
                    with torch.no_grad():
                        p.copy_(handles[path].get_tensor(key).to(p.dtype))
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
                  "sdxl-random": lambda: random_sdxl.unet_config("sdxl-random"),
                  "sdxl-narrow": lambda: random_sdxl.unet_config("sdxl-narrow")}[name]()  # fmt: skip
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
    from spoxl.engine.host_memory import release_freed_memory

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
    if m.unet_file is not None:  # a single file replaces the folder's UNet weights (its config stays)
        from spoxl.models.loading import _check_file

        weights = Path(m.unet_file).expanduser()
        _check_file(weights, "unet")  # before anything is built: a typo fails in a second

    def build():
        unet, _ = build_sharded_unet(config, ds, weights=weights, variant=m.variant, seed=seed)
        release_freed_memory()
        return unet

    components.unet = build()
    return components, build
