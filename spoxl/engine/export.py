"""Export trained UNet weights: LoRA (diffusers and kohya keys) and full/merged diffusers UNets.

API (every function is COLLECTIVE under ZeRO-3: call it on every rank; rank 0 writes, all ranks
return after the files exist; an error on rank 0 (bad overrides, a full disk) is raised as the
same one-line SpoxlError on every rank, so no rank is left waiting)
  export_lora(model, out_dir, formats=("diffusers", "kohya"), overrides=None) -> {format: Path}
      diffusers: OUT/pytorch_lora_weights.safetensors (StableDiffusionXLPipeline.save_lora_weights,
                 peft keys `unet.<module>.lora_A.weight`, LoraConfig in the metadata; loads with
                 pipeline.load_lora_weights and spoxl.models.lora.load_lora_into_unet)
      kohya:     OUT/pytorch_lora_weights_kohya.safetensors (sd-scripts' names: SDXL lora_unet_input_blocks_*, SD1.5 lora_unet_down_blocks_*,
                 + .alpha and ss_* metadata: sd-scripts, A1111/Forge, ComfyUI; spoxl.engine.kohya)
  export_unet(model, out_dir, merge_lora=True, overrides=None) -> Path of OUT/unet
      a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors) loadable with
      UNet2DConditionModel.from_pretrained(OUT, subfolder="unet"); with LoRA, the LoRA is fused
      into the base weights and the peft wrappers removed.
  export_all(model, out_dir, formats, ema=None) -> {name: Path}
      formats from {"diffusers", "kohya", "unet"}; with an EMA (spoxl.engine.ema.EMA) the same
      formats are written again from the EMA weights under OUT/ema/.
  lora_state_dict(model, overrides=None) -> peft-keyed LoRA tensors (scaling folded in)

`model` is a diffusers UNet2DConditionModel (LoRA attached with `unet.add_adapter(LoraConfig)`)
or a DeepSpeed engine around one, under ZeRO 0/1/2/3. `overrides` maps parameter names (those of
`unwrap(model).named_parameters()`) to replacement tensors, which is how EMA weights are
exported through the same code.

Exported LoRAs have alpha == rank: the layer's scaling (lora_alpha / r, or the rsLoRA variant)
is folded into lora_B (kohya: lora_up). Loaders disagree on where alpha comes from (safetensors
metadata, `.alpha` keys, or nothing), and with alpha == rank every one of them applies the same
weights as the trained module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from spoxl.engine.zero_utils import errors_on_every_rank, gathered_state_dict, is_rank0, unwrap
from spoxl.errors import SpoxlError

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
UNET_SUBFOLDER = "unet"
EMA_SUBFOLDER = "ema"
FORMATS = ("diffusers", "kohya", "unet")
LORA_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # UI LoRAs are usually fp16


# ---- LoRA --------------------------------------------------------------------------------------


def has_lora(model) -> bool:
    return bool(getattr(unwrap(model), "peft_config", None))


def _adapter_name(unet) -> str:
    names = list(unet.peft_config)
    if len(names) != 1:
        raise SpoxlError(f"expected one LoRA adapter on the UNet, found {names}")
    return names[0]


def _lora_layers(unet) -> dict[str, object]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in unet.named_modules() if isinstance(m, LoraLayer)}


def _apply_overrides(state: dict[str, torch.Tensor], overrides: dict[str, torch.Tensor] | None) -> None:
    if not overrides:
        return
    unknown = [k for k in overrides if k not in state]
    if unknown:
        raise SpoxlError(f"override weights name parameters the model does not have, e.g. {unknown[0]}")
    for k, v in overrides.items():
        if v.shape != state[k].shape:
            raise SpoxlError(f"override {k} has shape {tuple(v.shape)}, the model's is {tuple(state[k].shape)}")
        state[k] = v.detach().to("cpu", torch.float32, copy=True)


def lora_state_dict(model, overrides: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """peft-keyed UNet LoRA weights (e.g. `...to_q.lora_A.weight`), scaling folded into lora_B.

    Collective under ZeRO-3; returns {} on ranks other than 0.
    """
    from peft.utils import get_peft_model_state_dict

    unet = unwrap(model)
    if not has_lora(unet):
        raise SpoxlError("the model has no LoRA adapter to export (use the unet format for full fine-tuning)")
    adapter = _adapter_name(unet)
    # fp32 CPU copies under module.state_dict() names, on rank 0 ({} elsewhere).
    state = gathered_state_dict(model, keep=lambda n, t: f".{adapter}." in n and "lora_" in n, rank0_only=True)
    out: dict[str, torch.Tensor] = {}
    with errors_on_every_rank():  # rank 0 alone inside: its errors reach every rank
        if is_rank0():
            _apply_overrides(state, overrides)
            empty = [k for k, v in state.items() if v.numel() == 0]
            if empty:  # would mean a ZeRO-3 parameter escaped the gather; never write such a file
                raise SpoxlError(f"LoRA tensor {empty[0]} is empty after gathering")
            for module_name, layer in _lora_layers(unet).items():
                key = f"{module_name}.lora_B.{adapter}.weight"
                if key in state:
                    state[key] = state[key] * float(layer.scaling[adapter])
            peft = get_peft_model_state_dict(unet, state_dict=state, adapter_name=adapter)
            out = {k: v.contiguous() for k, v in peft.items()}
    return out


def _alpha_is_rank_metadata(unet) -> dict:
    """The adapter's LoraConfig as a dict, with alpha == r (the scaling is folded into the weights)."""
    cfg = unet.peft_config[_adapter_name(unet)].to_dict()
    cfg["lora_alpha"] = cfg["r"]
    cfg["alpha_pattern"] = dict(cfg.get("rank_pattern") or {})  # per-module alpha == per-module r
    cfg["use_rslora"] = False
    # json round-trip: sets (target_modules) are not JSON; the diffusers saver json.dumps this.
    return json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, (set, frozenset)) else str(o)))


def export_lora(
    model,
    out_dir,
    formats=("diffusers", "kohya"),
    overrides: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Path]:
    """Write the UNet LoRA as safetensors in the given formats (collective; rank 0 writes)."""
    bad = [f for f in formats if f not in ("diffusers", "kohya")]
    if bad:
        raise SpoxlError(f"unknown LoRA format {bad[0]!r} (use diffusers or kohya)")
    out_dir = Path(out_dir)
    unet = unwrap(model)
    peft_state = {k: v.to(dtype) for k, v in lora_state_dict(model, overrides).items()}
    paths = {}
    if "diffusers" in formats:
        paths["diffusers"] = out_dir / LORA_FILE
    if "kohya" in formats:
        paths["kohya"] = out_dir / KOHYA_FILE
    # The all_reduce that closes this block doubles as the barrier: every rank returns after the
    # files exist, or raises rank 0's error.
    with errors_on_every_rank():
        if is_rank0():
            _write_lora(unet, peft_state, out_dir, formats, paths)
    return paths


def _staging_dir(out_dir: Path) -> Path:
    """A fresh hidden folder beside the export's files: written there, then renamed into place, so a
    kill or a full disk mid-write never leaves a half-written file where the previous export was."""
    staging = out_dir / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _write_lora(unet, peft_state, out_dir: Path, formats, paths) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(out_dir)
    try:
        _write_lora_files(unet, peft_state, staging, formats)
        for path in paths.values():
            os.replace(staging / path.name, path)  # atomic per file
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_lora_files(unet, peft_state, out_dir: Path, formats) -> None:
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file, save_file

    if "diffusers" in formats:
        StableDiffusionXLPipeline.save_lora_weights(
            out_dir,
            # peft keys (lora_A/lora_B), what diffusers' own savers write today. Do NOT pass
            # through convert_state_dict_to_diffusers: diffusers 0.42 loads that older
            # `.lora.down` layout back without the attention LoRAs (checked in tests).
            unet_lora_layers=peft_state,
            unet_lora_adapter_metadata=_alpha_is_rank_metadata(unet),
            weight_name=LORA_FILE,
        )
        # diffusers' own metadata (the adapter config) plus the keys UIs use to tell an SDXL LoRA.
        from safetensors import safe_open

        path = out_dir / LORA_FILE
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        metadata.update({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
                         "ss_base_model_version": "sdxl_base_v1-0"})
        save_file(load_file(str(path)), str(path), metadata=metadata)
    if "kohya" in formats:
        from spoxl.engine.kohya import kohya_metadata, kohya_state_dict

        kohya = kohya_state_dict(peft_state, unet.config, dtype=next(iter(peft_state.values())).dtype)
        save_file(kohya, str(out_dir / KOHYA_FILE), metadata=kohya_metadata(peft_state, unet.config))


# ---- full / merged UNet ------------------------------------------------------------------------


def _fresh_unet(unet, state: dict[str, torch.Tensor]):
    """A new UNet2DConditionModel (same config, LoRA attached the same way) holding `state`.

    Built on the meta device and filled with load_state_dict(assign=True), so rank 0 never holds
    two full copies of the weights.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        fresh = UNet2DConditionModel.from_config(dict(unet.config))
        if has_lora(unet):
            adapter = _adapter_name(unet)
            fresh.add_adapter(unet.peft_config[adapter], adapter_name=adapter)
    missing, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise SpoxlError(f"UNet state does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return fresh


def export_unet(
    model,
    out_dir,
    merge_lora: bool = True,
    overrides: dict[str, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write OUT/unet as a diffusers UNet folder (collective; rank 0 writes).

    With LoRA attached and merge_lora, the LoRA is fused into the base weights (W + scale*B@A)
    by peft's own merge, and the wrappers removed, so the folder is a plain SDXL UNet.
    """
    unet = unwrap(model)
    if has_lora(unet) and not merge_lora:  # known on every rank: fail before gathering
        raise SpoxlError("a LoRA UNet can only be exported as a merged UNet (or use diffusers/kohya)")
    state = gathered_state_dict(model, rank0_only=True)
    target = Path(out_dir) / UNET_SUBFOLDER
    with errors_on_every_rank():  # its closing all_reduce doubles as the barrier
        if is_rank0():
            _apply_overrides(state, overrides)
            fresh = _fresh_unet(unet, state)
            del state
            if has_lora(fresh):
                fresh.fuse_lora(lora_scale=1.0)
                fresh.unload_lora()
            fresh.to(dtype)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = _staging_dir(target.parent)
            try:
                fresh.save_pretrained(staging / UNET_SUBFOLDER, safe_serialization=True)
                _replace_dir(staging / UNET_SUBFOLDER, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _replace_dir(new: Path, target: Path) -> None:
    """Put the complete folder `new` where `target` is: the old one moves aside first and is deleted
    only after the new one is in place (a crash in between leaves one of them whole, never a mix)."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


# ---- everything at once ------------------------------------------------------------------------


def export_all(model, out_dir, formats=("diffusers", "kohya"), ema=None, lora_dtype: str = "fp32") -> dict[str, Path]:
    """Export `formats` to OUT and, given an EMA, the EMA weights in the same formats to OUT/ema.

    Collective under ZeRO-3. Returns {format: path} plus {"ema/<format>": path}.
    """
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise SpoxlError(f"unknown export format {bad[0]!r} (choose from {', '.join(FORMATS)})")
    lora_formats = [f for f in formats if f != "unet"]
    if lora_formats and not has_lora(model):
        raise SpoxlError(f"format {lora_formats[0]} needs a LoRA run; a full fine-tune exports as unet")
    out_dir = Path(out_dir)
    targets = [("", None)]
    if ema is not None:
        targets.append((EMA_SUBFOLDER, ema.shadow_params()))
    paths: dict[str, Path] = {}
    for sub, overrides in targets:
        where = out_dir / sub if sub else out_dir
        prefix = f"{sub}/" if sub else ""
        if lora_formats:
            for f, p in export_lora(model, where, lora_formats, overrides, dtype=LORA_DTYPES[lora_dtype]).items():
                paths[prefix + f] = p
        if "unet" in formats:
            paths[prefix + "unet"] = export_unet(model, where, overrides=overrides)
    return paths


# ---- from a saved DeepSpeed checkpoint (offline, one process) --------------------------------


def resolve_checkpoint(path, tag: str | None = None) -> tuple[Path, str, Path | None]:
    """(checkpoint dir, tag, run config.yaml or None) for a run dir, a checkpoint dir or a tag dir.

    The tag is, in order: the one given, `latest_spoxl` (spoxl.engine.checkpoint, complete
    checkpoints only), DeepSpeed's own `latest` file, or the tag folder that was passed.
    """
    from spoxl.engine.checkpoint import latest_tag

    path = Path(path).expanduser()
    if not path.exists():
        raise SpoxlError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise SpoxlError(f"checkpoint {path} is not a folder (pass a run dir or a checkpoint dir)")
    if (path / "checkpoints").is_dir():
        ckpt_dir = path / "checkpoints"
    elif any(path.glob("*model_states.pt")):  # a tag folder itself
        ckpt_dir, tag = path.parent, tag or path.name
    else:
        ckpt_dir = path
    if tag is None:
        tag = latest_tag(ckpt_dir)
    if tag is None and (ckpt_dir / "latest").is_file():
        tag = (ckpt_dir / "latest").read_text().strip()
    if tag is None:
        raise SpoxlError(f"no complete checkpoint in {ckpt_dir}")
    if not any((ckpt_dir / tag).glob("*model_states.pt")):
        raise SpoxlError(f"checkpoint {ckpt_dir / tag} holds no DeepSpeed model states")
    config = next((c for c in (ckpt_dir.parent / "config.yaml", ckpt_dir / "config.yaml") if c.is_file()), None)
    return ckpt_dir, tag, config


def _load_unet(model_cfg):
    """The base UNet of a run (just the UNet when the model is a diffusers folder)."""
    from spoxl.models.loading import check_sdxl_folder, load_sdxl, resolve_model_path

    path = resolve_model_path(model_cfg.path)
    if path == "tiny" or path.startswith("tiny:") or model_cfg.unet_file:
        return load_sdxl(path, unet_file=model_cfg.unet_file, variant=model_cfg.variant).unet
    from diffusers import UNet2DConditionModel

    check_sdxl_folder(Path(path).expanduser())
    return UNet2DConditionModel.from_pretrained(Path(path).expanduser(), subfolder="unet", local_files_only=True)


def export_checkpoint(
    checkpoint,
    out_dir,
    formats=None,
    lora_dtype: str | None = None,
    config_path=None,
    tag: str | None = None,
    model: str | None = None,
    with_ema: bool = True,
) -> dict[str, Path]:
    """Rebuild the trained UNet from a DeepSpeed checkpoint (any ZeRO stage) and export it.

    Contract with spoxl.engine.checkpoint: DeepSpeed tag folders (model states written by
    engine.save_checkpoint, LoRA runs with exclude_frozen_parameters=True), `latest_spoxl`,
    per-rank `spoxl_rank{r}.pt` whose "ema" entry is EMA.state_dict() (or None), and the run's
    config.yaml beside the checkpoint dir. DeepSpeed's get_fp32_state_dict_from_zero_checkpoint
    merges the ZeRO shards into full fp32 tensors.
    """
    import torch

    from spoxl.config import load_config
    from spoxl.engine.ema import EMA
    from spoxl.engine.setup import attach_lora, use_cpu

    if use_cpu():
        import os

        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed picks its accelerator
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt_dir, tag, found_config = resolve_checkpoint(checkpoint, tag)
    config_path = config_path or found_config
    if config_path is None:
        raise SpoxlError(f"no config.yaml beside {ckpt_dir}: pass --config with the run's recipe")
    cfg = load_config(config_path, [f"model.path={model}"] if model else [])
    lora = cfg.lora.enabled
    formats = tuple(formats or cfg.export.formats or (("diffusers", "kohya") if lora else ("unet",)))

    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, exclude_frozen_parameters=lora)
    except Exception as e:  # DeepSpeed raises ValueError/FileNotFoundError/AssertionError on bad folders
        raise SpoxlError(f"cannot read DeepSpeed checkpoint {ckpt_dir / tag}: {str(e).splitlines()[0]}") from None
    unet = _load_unet(cfg.model)
    if lora:
        attach_lora(unet, cfg.lora)
    expected = {n for n, p in unet.named_parameters() if p.requires_grad} if lora else set(unet.state_dict())
    unexpected = sorted(set(state) - set(unet.state_dict()))
    missing = sorted(expected - set(state))
    if unexpected or missing:
        bad = (unexpected or missing)[0]
        what = "has a tensor the model lacks" if unexpected else "lacks the tensor"
        raise SpoxlError(f"checkpoint {ckpt_dir / tag} does not match the run's model ({what} {bad}); wrong --config/--model?")
    unet.load_state_dict(state, strict=False)

    ema = None
    own = ckpt_dir / tag / "spoxl_rank0.pt"
    if with_ema and own.is_file():
        saved = torch.load(own, map_location="cpu", weights_only=True).get("ema")
        if saved is not None:
            ema = EMA.from_state_dict(saved)
    return export_all(unet, out_dir, formats=formats, ema=ema, lora_dtype=lora_dtype or cfg.export.lora_dtype)
