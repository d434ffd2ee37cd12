"""Load SDXL (or SD1.5) components from local paths only; never download.

Accepted sources:
  * "tiny" (optionally "tiny:SEED"): the toy SDXL architecture built in code (spoxl.models.tiny);
    "tiny-sd15[:SEED]" the same for the SD1.5 architecture (one text encoder, no added conditioning);
    "sdxl-random[:SEED]" the REAL SDXL architecture with random weights (spoxl.models.random_sdxl);
    "sdxl-narrow[:SEED]" the same layout at 0.4 of the UNet's width (full fine-tuning measured on CPU);
  * "toy": the pretrained toy-world model shipped in the package (spoxl/toy/weights/), loaded as
    the diffusers folder it is, by the same code as a real checkpoint;
  * a diffusers-format folder (model_index.json, unet/, vae/, text_encoder/, text_encoder_2/,
    tokenizer/, tokenizer_2/, scheduler/), e.g. a local copy of stable-diffusion-xl-base-1.0 or
    the output of `spoxl make-tiny`; or an SD1.5 folder (StableDiffusionPipeline in
    model_index.json, no text_encoder_2/ or tokenizer_2/), e.g. stable-diffusion-v1-5;
  * single-file .safetensors checkpoints for the UNet and/or the VAE (original SDXL/LDM keys or
    diffusers keys), whose architecture configs come from a diffusers folder.
"""

from __future__ import annotations

import json
import re
import os
from pathlib import Path

import torch

from spoxl.errors import SpoxlError
from spoxl.models.components import SDXLComponents

# What each subfolder must hold before we hand it to from_pretrained (which would otherwise try
# the hub or fail with a long traceback).
_REQUIRED_FILES = {
    "unet": ["config.json"],
    "vae": ["config.json"],
    "text_encoder": ["config.json"],
    "text_encoder_2": ["config.json"],
    "tokenizer": [],
    "tokenizer_2": [],
    "scheduler": ["scheduler_config.json"],
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
WEIGHT_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
_EXPECTED_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
                   "text_encoder_2": "model"}
# weights[.variant][-0000i-of-0000n].safetensors|bin, and the shard index weights.safetensors.index[.variant].json
# (diffusers and transformers also write shards as weights.variant-0000i-of-0000n.safetensors).
_WEIGHT_FILE = re.compile(r"^[A-Za-z_]+(?:\.(?P<v1>[A-Za-z0-9_]+))?(?:-\d{5}-of-\d{5})?\.(?:safetensors|bin)$")
_INDEX_FILE = re.compile(r"^[A-Za-z_]+\.(?:safetensors|bin)\.index(?:\.(?P<v2>[A-Za-z0-9_]+))?\.json$")


def weight_variants(folder: Path) -> set[str | None]:
    """The weight variants a part's folder holds: None for plain files, "fp16" for *.fp16.safetensors, ..."""
    found: set[str | None] = set()
    for p in folder.iterdir():
        m = _WEIGHT_FILE.match(p.name) or _INDEX_FILE.match(p.name)
        if m:
            found.add(m.groupdict().get("v1") or m.groupdict().get("v2"))
    return found


def choose_variant(folder: Path, requested: str | None) -> str | None:
    """Which variant to load for one part: the requested one when the folder has it, else the plain
    weights; with nothing requested, the plain weights, or the only variant there is (stabilityai's
    SDXL folders can be downloaded with only *.fp16.safetensors)."""
    found = weight_variants(folder)
    if requested is not None and requested in found:
        return requested
    if None in found:
        return None
    if requested is not None:
        raise SpoxlError(f"{folder} has no {requested!r} weights (it has: {', '.join(sorted(map(str, found)))})")
    if len(found) == 1:
        return next(iter(found))
    raise SpoxlError(f"{folder} holds several weight variants ({', '.join(sorted(map(str, found)))}) and no plain "
                     f"weights: choose one with model.variant (--variant)")


def _offline() -> None:
    # Belt and braces: even a misconfigured call into the hub libraries must not reach the network.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


SD15_PIPELINE = "StableDiffusionPipeline"


def folder_architecture(path: Path) -> str:
    """"sd15" when model_index.json names StableDiffusionPipeline (or, without an index, the folder
    has no text_encoder_2/), else "sdxl"."""
    index = path / "model_index.json"
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError) as e:
            raise SpoxlError(f"{index} is not valid JSON: {e}") from None
        if name == SD15_PIPELINE:
            return "sd15"
        if name is not None:
            return "sdxl"
    return "sdxl" if (path / "text_encoder_2").is_dir() else "sd15"


def check_sdxl_folder(path: Path) -> None:
    """Raise a one-line SpoxlError naming the first thing missing from a diffusers SDXL (or SD1.5) folder."""
    if not path.exists():
        raise SpoxlError(f"model path {path} does not exist")
    if not path.is_dir():
        raise SpoxlError(f"model path {path} is not a folder (use --unet-file for a single .safetensors)")
    sd15 = folder_architecture(path) == "sd15"
    for sub, files in _REQUIRED_FILES.items():
        if sd15 and sub.endswith("_2"):
            continue
        folder = path / sub
        if not folder.is_dir():
            raise SpoxlError(f"model folder {path} has no {sub}/ subfolder")
        for name in files:
            f = folder / name
            if not f.is_file():
                raise SpoxlError(f"model folder {path} is missing {sub}/{name}")
            try:
                json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise SpoxlError(f"{f} is not valid JSON: {e}") from None
        if sub in WEIGHT_PARTS:
            if not weight_variants(folder):
                raise SpoxlError(f"model folder {path} has no weights in {sub}/: looked for "
                                 f"{_EXPECTED_NAMES[sub]}[.fp16].safetensors / .bin, sharded or not")
        if sub.startswith("tokenizer") and not any(folder.iterdir()):
            raise SpoxlError(f"model folder {path} has an empty {sub}/ subfolder")


BUILT_IN = ("tiny", "tiny-sd15", "sdxl-random", "sdxl-narrow")  # models built in code: NAME or NAME:SEED


def built_in_model(model: str) -> tuple[str, int]:
    """(name, seed) of a built-in model name such as "tiny:3"."""
    name, _, seed = str(model).partition(":")
    try:
        return name, int(seed or 0)
    except ValueError:
        raise SpoxlError(f"model {model!r}: the seed after ':' must be an integer") from None


def resolve_model_path(model: str) -> str:
    """The folder behind a model name: "toy" is the shipped toy-world folder; anything else is
    returned unchanged ("tiny[:SEED]" or a path)."""
    if str(model) == "toy":
        from spoxl.paths import toy_model_path

        return str(toy_model_path())
    return str(model)


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise SpoxlError(f"{what} checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise SpoxlError(f"{what} checkpoint {path} must be a .safetensors file")


def load_sdxl(
    model: str | os.PathLike,
    *,
    unet_file: str | os.PathLike | None = None,
    vae_file: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    vae_path: str | os.PathLike | None = None,
    with_unet: bool = True,
) -> SDXLComponents:
    """Load all SDXL parts (frozen VAE/text encoders, UNet in train-ready fp32 unless dtype says).

    `model` is "tiny[:SEED]", "toy" or a diffusers SDXL folder; `unet_file`/`vae_file` replace the UNet
    or VAE weights with a single-file checkpoint whose config comes from that folder. `variant`
    ("fp16") picks *.fp16.safetensors weights where a part has them; None picks the plain weights,
    or a part's only variant when it has no plain ones (spoxl.models.loading.choose_variant).
    with_unet=False leaves components.unet None (ZeRO-3 builds it partitioned: spoxl.engine.sharded).
    """
    _offline()
    model = str(model)
    if model.split(":", 1)[0] in BUILT_IN:
        name, seed = built_in_model(model)
        if name.startswith("sdxl-"):
            from spoxl.models.random_sdxl import build_random_sdxl

            parts = build_random_sdxl(seed, with_unet=with_unet, name=name)
        else:
            from spoxl.models.tiny import build_tiny_sd15, build_tiny_sdxl

            parts = (build_tiny_sd15 if name == "tiny-sd15" else build_tiny_sdxl)(seed)
        config_dir = None
    else:
        config_dir = Path(resolve_model_path(model)).expanduser()
        check_sdxl_folder(config_dir)
        parts = _load_folder(config_dir, variant, with_unet=with_unet)
        parts.force_zeros_for_empty_prompt = _force_zeros(config_dir)
    if vae_path is not None:
        if vae_file is not None:
            raise SpoxlError("give the VAE as a folder (model.vae_path) or as a single file (model.vae_file), not both")
        parts.vae = _load_vae_folder(Path(vae_path).expanduser())
    if unet_file is not None or vae_file is not None:
        if config_dir is None:
            # The tiny model has no folder; save its configs to a temporary one for from_single_file.
            import tempfile

            tmp = tempfile.TemporaryDirectory()
            config_dir = Path(tmp.name)
            parts.save_pretrained(config_dir)
        if unet_file is not None:
            parts.unet = _load_single_file("unet", Path(unet_file), config_dir)
        if vae_file is not None:
            parts.vae = _load_single_file("vae", Path(vae_file), config_dir)
    if not with_unet:
        parts.unet = None
    parts.to(dtype=dtype)
    parts.freeze_frozen_parts()
    if parts.unet is not None:
        parts.unet.eval()
    return parts


def _load_vae_folder(path: Path):
    """A diffusers AutoencoderKL folder (config.json + weights), or its parent with a vae/ inside."""
    from diffusers import AutoencoderKL

    if (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise SpoxlError(f"VAE folder {path} has no config.json (a diffusers AutoencoderKL folder is expected)")
    try:
        return AutoencoderKL.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise SpoxlError(f"could not load VAE folder {path}: {str(e).splitlines()[0]}") from None


def _force_zeros(folder: Path) -> bool:
    """model_index.json's force_zeros_for_empty_prompt; absent means true, as diffusers'
    StableDiffusionXLPipeline (SDXL base sets it true: its CFG negative is all zeros). SD1.5 has no
    such flag: StableDiffusionPipeline's negative is the encoded empty prompt."""
    if folder_architecture(folder) == "sd15":
        return False
    index = folder / "model_index.json"
    try:
        value = json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True) if index.is_file() else True
    except (OSError, ValueError) as e:
        raise SpoxlError(f"{index} is not valid JSON: {e}") from None
    return bool(value)


def _load_folder(path: Path, variant: str | None = None, *, with_unet: bool = True) -> SDXLComponents:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    kw = dict(local_files_only=True)
    sdxl = folder_architecture(path) == "sdxl"
    parts = WEIGHT_PARTS if sdxl else tuple(p for p in WEIGHT_PARTS if p != "text_encoder_2")
    v = {part: choose_variant(path / part, variant) for part in parts}
    try:
        return SDXLComponents(
            unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", variant=v["unet"], **kw) if with_unet else None,
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", variant=v["vae"], **kw),
            text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", variant=v["text_encoder"], **kw),
            text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2",
                                                                       variant=v["text_encoder_2"], **kw)
            if sdxl else None,
            tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer", **kw),
            tokenizer_2=AutoTokenizer.from_pretrained(path / "tokenizer_2", **kw) if sdxl else None,
            # Whatever scheduler the folder names, spoxl samples with DDIM on the same schedule.
            scheduler=DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw),
        )
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SpoxlError(f"could not load {'SDXL' if sdxl else 'SD1.5'} folder {path}: {str(e).splitlines()[0]}") from None


def _load_single_file(part: str, file: Path, config_dir: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    _check_file(file, part)
    cls = UNet2DConditionModel if part == "unet" else AutoencoderKL
    try:
        return cls.from_single_file(str(file), config=str(config_dir), subfolder=part, local_files_only=True)
    except Exception as e:  # diffusers raises many types for a wrong/corrupt file
        raise SpoxlError(f"could not load {part} checkpoint {file}: {str(e).splitlines()[0]}") from None
