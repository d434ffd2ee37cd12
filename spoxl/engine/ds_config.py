"""The ONE place that turns a recipe (spoxl.config.Config) + a ds_configs/*.json into the dict
handed to deepspeed.initialize.

The JSON carries the ZeRO recipe (stage, offload, buckets); the YAML recipe carries what a user
tunes per run (micro-batch, accumulation, clipping, precision). Values the JSON leaves "auto" are
filled from the recipe; a JSON value that disagrees with the recipe is a contradiction and a
one-line error (better than silently training with a batch size nobody asked for). Native
deepspeed.initialize does not resolve HF-style "auto" (it crashes or keeps the string), so every
"auto" is resolved here or rejected.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from spoxl.errors import SpoxlError

REPO_ROOT = Path(__file__).resolve().parents[2]

# DeepSpeed's own defaults for the bucket sizes Accelerate would derive from hidden_size (a UNet
# config has none); explicit numbers keep them independent of the DeepSpeed version.
_ZERO_AUTO_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
}
# Sections we build ourselves; a JSON that sets them would be silently ignored or fight the recipe.
_OWNED_SECTIONS = {
    "optimizer": "the optimizer comes from the recipe's optim section",
    "scheduler": "the LR schedule comes from the recipe's train.lr_schedule/warmup_steps",
}


def resolve_ds_config_path(name: str) -> Path:
    """A ds_config path as given, relative to the repository, or a bare name like 'zero3'."""
    candidates = [Path(name), REPO_ROOT / name]
    if not name.endswith(".json"):
        candidates += [REPO_ROOT / "ds_configs" / f"{name}.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise SpoxlError(f"deepspeed config {name} does not exist (give a path or one of: "
                     f"{', '.join(p.stem for p in sorted((REPO_ROOT / 'ds_configs').glob('*.json')))})")


def load_ds_json(name: str) -> dict:
    path = resolve_ds_config_path(name)
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise SpoxlError(f"deepspeed config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise SpoxlError(f"deepspeed config {path} must hold a JSON object")
    return data


def _merge(ds: dict, key: str, value, where: str) -> None:
    """Set ds[key] = value unless the JSON already says something else (then: contradiction)."""
    current = ds.get(key, "auto")
    if current == "auto" or current is None:
        ds[key] = value
    elif current != value:
        raise SpoxlError(f"deepspeed config sets {key}={current!r} but the recipe gives {value!r} ({where}); "
                         f"remove it from the JSON or make them agree")


def fp16_supported_on_cpu() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:
        return False


def build_ds_config(cfg, world_size: int, *, on_cpu: bool = False) -> dict:
    """The deepspeed.initialize config for this recipe at this world size."""
    ds = copy.deepcopy(load_ds_json(cfg.deepspeed.config))
    t = cfg.train
    for key, why in _OWNED_SECTIONS.items():
        if key in ds:
            raise SpoxlError(f"deepspeed config has an '{key}' section; remove it: {why}")

    # Batch: train_batch_size = micro * accum * world, the invariant DeepSpeed asserts.
    _merge(ds, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size")
    _merge(ds, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum")
    expected = t.micro_batch_size * t.grad_accum * world_size
    tbs = ds.get("train_batch_size", "auto")
    if tbs not in ("auto", None) and tbs != expected:
        raise SpoxlError(
            f"deepspeed config train_batch_size={tbs} does not equal micro_batch_size {t.micro_batch_size} x "
            f"grad_accum {t.grad_accum} x world size {world_size} = {expected}")
    ds["train_batch_size"] = expected

    # DeepSpeed >= 0.19.3 clips at 1.0 unless told otherwise: always set it from the recipe.
    _merge(ds, "gradient_clipping", float(t.grad_clip), "train.grad_clip")

    _apply_precision(ds, cfg.deepspeed.precision, on_cpu)

    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if not isinstance(zero, dict):
        raise SpoxlError("deepspeed config zero_optimization must be an object")
    _check_integers(ds)
    if int(zero.get("stage", 0)) not in (1, 2, 3):
        # Stage 0 steps a plain optimizer with no overflow check: a NaN gradient would be applied.
        # ZeRO-1 costs the same memory on one GPU and skips non-finite steps.
        raise SpoxlError(f"deepspeed config zero_optimization.stage must be 1, 2 or 3, got {zero.get('stage', 0)}")
    if zero.get("compute_grad_norm") is False:
        raise SpoxlError("deepspeed config zero_optimization.compute_grad_norm=false is not supported "
                         "(spoxl logs the grad norm and skips steps whose norm is not finite)")
    for key, default in _ZERO_AUTO_DEFAULTS.items():
        if zero.get(key) == "auto":
            zero[key] = default
    if cfg.optim.name == "adamw8bit":
        # bitsandbytes optimizers are "untested" for DeepSpeed and refused without this flag.
        ds["zero_allow_untested_optimizer"] = True
    offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    if offload and cfg.optim.name == "adamw8bit":
        raise SpoxlError("optim.name=adamw8bit cannot be combined with offload_optimizer (bitsandbytes "
                         "states live on the accelerator); use optim.name=adamw with an offload config")
    if offload:
        # A client torch optimizer stepping offloaded (CPU) fp32 master weights is supported; DeepSpeed
        # would otherwise insist on its JIT-built DeepSpeedCPUAdam.
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    if cfg.checkpoint.load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves; DeepSpeed's prints flood rank logs

    leftover = _find_auto(ds)
    if leftover:
        raise SpoxlError(f"deepspeed config value {leftover} is 'auto' and spoxl cannot resolve it; give a number")
    return ds


# Fields DeepSpeed reads as integers ("auto" is resolved before this check): a string or a fraction
# there would fail deep inside deepspeed.initialize on every rank, with a traceback.
_INTEGER_FIELDS = (
    "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "steps_per_print",
    "zero_optimization.stage", "zero_optimization.reduce_bucket_size", "zero_optimization.allgather_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold",
    "zero_optimization.stage3_max_live_parameters", "zero_optimization.stage3_max_reuse_distance",
    "zero_optimization.sub_group_size", "fp16.initial_scale_power", "fp16.loss_scale_window", "fp16.hysteresis",
    "fp16.min_loss_scale",
)


def _check_integers(ds: dict) -> None:
    for dotted in _INTEGER_FIELDS:
        node = ds
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None or node == "auto":
            continue
        integral = isinstance(node, int) or (isinstance(node, float) and node.is_integer())
        if isinstance(node, bool) or not integral:
            raise SpoxlError(f"deepspeed config {dotted} must be an integer, got {node!r}")


def _apply_precision(ds: dict, precision: str, on_cpu: bool) -> None:
    wanted = {"bf16": precision == "bf16", "fp16": precision == "fp16"}
    for section, enabled in wanted.items():
        block = ds.get(section)
        if block is None:
            block = ds[section] = {}
        if not isinstance(block, dict):
            raise SpoxlError(f"deepspeed config {section} must be an object")
        current = block.get("enabled", "auto")
        if current not in ("auto", None) and bool(current) != enabled:
            raise SpoxlError(f"deepspeed config sets {section}.enabled={current} but deepspeed.precision is "
                             f"{precision}; pick precision in the recipe only")
        block["enabled"] = enabled
    if precision == "fp16":
        fp16 = ds["fp16"]
        fp16.setdefault("loss_scale", 0)  # dynamic loss scaling
        fp16.setdefault("initial_scale_power", 16)
        if on_cpu and not fp16_supported_on_cpu():
            raise SpoxlError("deepspeed.precision=fp16 is not supported by this CPU (no mkldnn fp16); use bf16 or fp32")


def _find_auto(node, prefix: str = "") -> str | None:
    if isinstance(node, dict):
        for k, v in node.items():
            found = _find_auto(v, f"{prefix}.{k}" if prefix else k)
            if found:
                return found
    elif node == "auto":
        return prefix
    return None


def compute_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
