"""Typed training configuration: dataclasses per section, loaded from a YAML recipe under configs/,
overridable from the command line with `--set section.key=value` (the value is parsed as YAML,
so `--set lora.target_modules=[to_q,to_k]` and `--set train.lr=1e-5` both work).

Unknown keys and wrong types are one-line SpoxlErrors naming the key. The `method:` section holds
`name` plus the method's own hyper-parameters, validated against the dataclass its Objective
declares (`Objective.Config`, see spoxl.methods.base; found through spoxl.registry).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from spoxl.errors import SpoxlError


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # TensorBoard, log file, checkpoints, exports live here
    seed: int = 0


@dataclass
class ModelConfig:
    path: str = "tiny"  # "tiny[:SEED]", "toy" (the pretrained toy-world model) or a local diffusers SDXL folder
    unet_file: Optional[str] = None  # single-file .safetensors replacing the UNet weights
    vae_file: Optional[str] = None
    # A diffusers AutoencoderKL folder replacing the model's VAE (e.g. the fp16-fix SDXL VAE, for
    # fp16 runs: SDXL's own VAE overflows in fp16).
    vae_path: Optional[str] = None
    # The frozen VAE's dtype: fp32 (default; the official Diffusion-DPO keeps it so, and encoding
    # at bf16/fp16 rounds the latents every method trains on) or "compute" (the run's precision).
    vae_dtype: Literal["fp32", "compute"] = "fp32"
    # Keep the frozen text encoders in host memory, moved to the accelerator only while encoding
    # (SPO encodes once per sampling round): 1.6 GB of bf16 off each card at SDXL size.
    offload_text_encoders: bool = False
    prediction_type: Optional[str] = None  # None: the scheduler's (epsilon for SDXL base)
    # Weight files to load ("fp16": *.fp16.safetensors). None: the plain weights, or a part's only
    # variant when it has no plain ones (SDXL folders downloaded with only fp16 files load as they are).
    variant: Optional[str] = None


@dataclass
class LoraConfig:
    enabled: bool = True  # False: full fine-tuning of the UNet
    rank: int = 4
    alpha: float = 4.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = 0.0


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps
    lr: float = 1e-4
    warmup_steps: int = 0  # linear warmup from 0 to lr
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # after warmup
    micro_batch_size: int = 1  # per rank
    grad_accum: int = 1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    gradient_checkpointing: bool = False
    max_nonfinite_steps: int = 5  # this many NaN/inf steps in a row abort the run
    dist_timeout_minutes: int = 30  # process-group timeout (collectives that hang this long fail)
    # Wall-clock budget of the training loop (setup excluded): the run stops after the optimizer step
    # that crosses it, then saves and exports as usual. None: only max_steps ends the run.
    max_minutes: Optional[float] = None
    # Host allocations of at least this many MiB are their own mmap, handed back to the OS when
    # freed (spoxl.engine.host_memory): glibc's default lets a ZeRO-3 rank's heap grow with freed
    # all-gather buffers (real-size SPO: 10.89 GB peak with it, 9.35 GB with 16). None: glibc's default.
    host_mmap_threshold_mib: Optional[float] = 16.0


# glibc caps M_MMAP_THRESHOLD at 32 MiB on 64-bit (spoxl.engine.host_memory applies the setting).
MAX_HOST_MMAP_THRESHOLD_MIB = 32


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class DeepSpeedConfig:
    config: str = "ds_configs/zero2.json"  # the ZeRO recipe; batch/precision/clipping come from here
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"


@dataclass
class CheckpointConfig:
    every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    keep_last: int = 2
    dir: Optional[str] = None  # default: <output_dir>/checkpoints
    save_final: bool = True
    load_universal: bool = False  # --resume from <tag>_universal (made by `python -m spoxl.engine.checkpoint to-universal`)


@dataclass
class LoggingConfig:
    every: int = 1  # optimizer steps between scalar logs
    tensorboard: bool = True
    sample_every: int = 0  # optimizer steps between sample grids; 0: never
    sample_prompts: list[str] = field(default_factory=lambda: ["a red circle", "a blue square"])
    sample_steps: int = 10
    sample_cfg: float = 5.0
    sample_seed: int = 0
    progress: bool = True  # tqdm on rank 0


@dataclass
class DataConfig:
    path: Optional[str] = None  # image folder (+ .txt captions), .jsonl or .parquet; None: synthetic
    resolution: int = 64
    image_column: Optional[str] = None  # None: the first of image / image_path / file_name / jpg
    caption_column: Optional[str] = None  # None: the first of caption / text / prompt
    # Preference pairs (DPO / MaPO / NCP): Pick-a-Pic's column names, and what a tie (label 0.5) does.
    image_0_column: str = "jpg_0"
    image_1_column: str = "jpg_1"
    label_column: str = "label_0"  # P(image 0 preferred): 1, 0, or 0.5 for a tie
    ties: Literal["drop", "keep"] = "drop"  # keep: image 0 as the winner, flagged tie (NCP's official loader)
    crop: Literal["center", "random"] = "center"
    hflip: bool = False
    cache_dir: Optional[str] = None  # VAE latents + text embeddings cached here
    # Offline methods: the share of captions replaced by the empty caption at each step (the
    # official Diffusion-DPO's proportion_empty_prompts, 0.2), so the model keeps its
    # unconditional branch for CFG; drawn per sample from the run's generator, after the noise.
    caption_dropout: float = 0.0
    shuffle: bool = True
    synthetic_size: int = 8  # samples in the built-in synthetic dataset (tests, smoke runs)


@dataclass
class EMAConfig:
    enabled: bool = False  # an EMA of the trained weights, outside DeepSpeed, exported beside them
    decay: float = 0.999
    warmup: bool = False
    every_n_steps: int = 1


@dataclass
class ExportConfig:
    at_end: bool = True  # write <output_dir>/export when training finishes
    formats: Optional[list[str]] = None  # None: diffusers + kohya for LoRA, unet for full fine-tuning
    lora_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # of the LoRA files (UI LoRAs are usually fp16)


@dataclass
class MethodConfig:
    name: str = "sft"
    params: Any = None  # the method's Config dataclass instance (filled by load_config)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else Path(self.run.output_dir) / "checkpoints"

    def to_dict(self) -> dict:
        """Plain dict (YAML-able) of the whole config, method params flattened into `method`."""
        d = dataclasses.asdict(self)
        params = d["method"].pop("params") or {}
        d["method"].update(params)
        return d


# ---------------------------------------------------------------------------------------------
# Building typed dataclasses from plain dicts, with one-line errors


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Check (and minimally convert) `value` against the annotation `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _coerce(value, a, where)
            except SpoxlError as e:
                errors.append(e)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise SpoxlError(f"config: {where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpoxlError(f"config: {where} must be a mapping, got {type(value).__name__}")
        return build_dataclass(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SpoxlError(f"config: {where} must be a list, got {value!r}")
        item = args[0] if args else Any
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise SpoxlError(f"config: {where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise SpoxlError(f"config: {where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpoxlError(f"config: {where} must be an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads "1e-4" (no dot) as a string; accept numeric strings for floats only.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpoxlError(f"config: {where} must be a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf: never a meaningful setting
            raise SpoxlError(f"config: {where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpoxlError(f"config: {where} must be a string, got {value!r}")
        return value
    raise SpoxlError(f"config: {where} has an unsupported type {_type_name(tp)}")


def build_dataclass(cls, data: dict, where: str = ""):
    """An instance of dataclass `cls` from a dict: unknown keys and wrong types are SpoxlErrors."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise SpoxlError(f"config: unknown key {key} (known in {where or 'top level'}: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# YAML + --set overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], yaml-parsed c)."""
    import yaml

    if "=" not in text:
        raise SpoxlError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise SpoxlError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise SpoxlError(f"--set {text!r}: {p} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _strict_loader():
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one
    silently: a second `train:` section would replace the first without a word)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpoxlError(f"{key!r} is written twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return StrictLoader


def read_yaml(path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SpoxlError(f"config file {path} does not exist" if not path.exists() else f"config file {path} is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise SpoxlError(f"config file {path} is not UTF-8 text (a binary file?)") from None
    except OSError as e:
        raise SpoxlError(f"config file {path} cannot be read: {e.strerror}") from None
    if not text.strip():
        raise SpoxlError(f"config file {path} is empty")
    try:
        data = yaml.load(text, Loader=_strict_loader())  # noqa: S506 (a SafeLoader subclass)
    except SpoxlError as e:
        raise SpoxlError(f"config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise SpoxlError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        raise SpoxlError(f"config file {path} holds no settings (only comments?)")
    if not isinstance(data, dict):
        raise SpoxlError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    for section, value in data.items():
        if value is not None and not isinstance(value, dict):
            raise SpoxlError(f"config file {path}: section {section!r} must be a mapping of settings, got {value!r}")
    return data


def config_from_dict(data: dict) -> Config:
    data = dict(data)
    for section, value in data.items():
        if value is not None and not isinstance(value, dict):
            raise SpoxlError(f"config: section {section!r} must be a mapping of settings, got {value!r}")
    method = dict(data.pop("method", None) or {})
    cfg = build_dataclass(Config, data)
    name = method.pop("name", "sft")
    if not isinstance(name, str):
        raise SpoxlError(f"config: method.name must be a string, got {name!r}")
    from spoxl.registry import objective_class

    params_cls = objective_class(name).Config
    cfg.method = MethodConfig(name=name, params=build_dataclass(params_cls, method, "method"))
    validate(cfg)
    return cfg


def load_config(path=None, overrides: list[str] | None = None) -> Config:
    """The Config of a YAML recipe (or the defaults when path is None) with --set overrides."""
    data = read_yaml(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))


def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express (one-line errors)."""
    positive = {
        "train.max_steps": cfg.train.max_steps,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "train.max_nonfinite_steps": cfg.train.max_nonfinite_steps,
        "train.dist_timeout_minutes": cfg.train.dist_timeout_minutes,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "logging.every": cfg.logging.every,
        "data.resolution": cfg.data.resolution,
    }
    if cfg.lora.enabled:
        positive["lora.rank"] = cfg.lora.rank
    for key, value in positive.items():
        if value <= 0:
            raise SpoxlError(f"config: {key} must be > 0, got {value}")
    for key, value in {
        "train.grad_clip": cfg.train.grad_clip,
        "train.warmup_steps": cfg.train.warmup_steps,
        "optim.weight_decay": cfg.optim.weight_decay,
        "checkpoint.every": cfg.checkpoint.every,
        "logging.sample_every": cfg.logging.sample_every,
    }.items():
        if value < 0:
            raise SpoxlError(f"config: {key} must be >= 0, got {value}")
    if cfg.train.lr <= 0:
        raise SpoxlError(f"config: train.lr must be > 0, got {cfg.train.lr}")
    if cfg.train.max_minutes is not None and not (0 < cfg.train.max_minutes < float("inf")):
        raise SpoxlError(f"config: train.max_minutes must be a number > 0 (or null), got {cfg.train.max_minutes}")
    mmap_mib = cfg.train.host_mmap_threshold_mib
    if mmap_mib is not None and not (0 < mmap_mib <= MAX_HOST_MMAP_THRESHOLD_MIB):
        raise SpoxlError(f"config: train.host_mmap_threshold_mib must be in (0, {MAX_HOST_MMAP_THRESHOLD_MIB}] MiB "
                         f"(glibc's range) or null, got {mmap_mib}")
    if len(cfg.optim.betas) != 2:
        raise SpoxlError(f"config: optim.betas must be two numbers, got {cfg.optim.betas}")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise SpoxlError(f"config: optim.betas must each be in [0, 1), got {cfg.optim.betas}")
    if cfg.optim.eps <= 0:
        raise SpoxlError(f"config: optim.eps must be > 0, got {cfg.optim.eps}")
    if cfg.logging.sample_steps <= 0:
        raise SpoxlError(f"config: logging.sample_steps must be > 0, got {cfg.logging.sample_steps}")
    if cfg.lora.enabled and not cfg.lora.target_modules:
        raise SpoxlError("config: lora.target_modules is empty")
    if cfg.model.prediction_type not in (None, "epsilon", "v_prediction"):
        raise SpoxlError(f"config: model.prediction_type must be epsilon or v_prediction, got {cfg.model.prediction_type!r}")
    for f in cfg.export.formats or []:
        if f not in ("diffusers", "kohya", "unet"):
            raise SpoxlError(f"config: export.formats entries must be diffusers, kohya or unet, got {f!r}")
        if f in ("diffusers", "kohya") and not cfg.lora.enabled:
            raise SpoxlError(f"config: export format {f} is a LoRA format but lora.enabled is false")
    if not 0.0 <= cfg.data.caption_dropout <= 1.0:
        raise SpoxlError(f"config: data.caption_dropout must be in [0, 1], got {cfg.data.caption_dropout}")
    if cfg.data.resolution % 8:
        raise SpoxlError(f"config: data.resolution must be a multiple of 8, got {cfg.data.resolution}")


def dump_yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
