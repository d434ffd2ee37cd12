"""Loading LoRA weights into a diffusers UNet for sampling (diffusers or kohya key formats)."""

from __future__ import annotations

from pathlib import Path

from spoxl.errors import SpoxlError


def load_lora_into_unet(unet, path, adapter_name: str = "spoxl") -> None:
    """Attach a LoRA saved as safetensors (diffusers/peft or kohya keys) to `unet` and activate it.

    diffusers' SDXL loader does the key conversion (kohya -> peft) for us; text-encoder LoRA
    keys, if present, are ignored because spoxl only trains the UNet.
    """
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob("*.safetensors"))
        if not candidates:
            raise SpoxlError(f"LoRA folder {path} holds no .safetensors file")
        path = candidates[0]
    if not path.is_file():
        raise SpoxlError(f"LoRA file {path} does not exist")
    try:
        # unet_config lets diffusers map sd-scripts' SGM block names (lora_unet_input_blocks_*) onto this UNet.
        state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=unet.config)
    except Exception as e:
        raise SpoxlError(f"could not read LoRA {path}: {str(e).splitlines()[0]}") from None
    unet_keys = {k: v for k, v in state_dict.items() if k.startswith("unet.")}
    if not unet_keys:
        raise SpoxlError(f"LoRA {path} has no UNet weights")
    if any(v.numel() == 0 for v in unet_keys.values()):
        raise SpoxlError(f"LoRA {path} has empty tensors (saved from ZeRO-3 without gathering?)")
    modules = {k.rsplit(".lora", 1)[0] for k in unet_keys}
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    diffusers_logging.get_logger("diffusers").setLevel(60)  # its own "unsuccessful" log: our one line says it
    try:
        unet.load_lora_adapter(unet_keys, prefix="unet", network_alphas=alphas, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as e:  # shapes of another model (e.g. SD1.5 LoRA on SDXL)
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(e).__name__)
        raise SpoxlError(f"LoRA {path} does not fit this UNet: {detail[:300]}") from None
    finally:
        diffusers_logging.set_verbosity(level)
    patched = {n for n, m in unet.named_modules() if adapter_name in getattr(m, "lora_A", {})}
    if not patched:
        # diffusers only warns when no key names a module of this UNet; a silent no-op is worse.
        raise SpoxlError(f"LoRA {path} does not fit this UNet: none of its {len(modules)} modules "
                         f"(e.g. {sorted(modules)[0]}) exists in the model")
