"""Per-rank memory of model states for each ZeRO stage, from DeepSpeed's own estimators.

The UNet (and the frozen SDXL components) are built on the meta device from their configs, so
the parameter counts are those of the real architecture and no weights are read or allocated.

What is estimated (activations are NOT included; they depend on resolution, batch and
gradient checkpointing):
  * trained states (weights, gradients, fp32 master weights, Adam moments) of the TRAINABLE
    parameters: DeepSpeed's `estimate_zero2_model_states_mem_needs` (stages 0-2) and
    `estimate_zero3_model_states_mem_needs` (stage 3), the functions behind DeepSpeed's
    `estimate_zero{2,3}_model_states_mem_needs_all_cold` printers. DeepSpeed has no stage-0/1
    estimator: stage 0 is the stage-2 formula on one rank (nothing sharded); stage 1 is the
    stage-2 formula plus the 16-bit gradients that stage 1 keeps whole on every rank.
  * frozen weights every rank holds: with LoRA the base UNet; with full fine-tuning the frozen
    reference copy when the method has one (sharded under ZeRO-3, like the policy); the VAE and
    both text encoders (never partitioned), all in the compute dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from spoxl.errors import SpoxlError

GiB = 1024**3

# The SDXL base 1.0 component configs shipped with the package (public config values).
SDXL_CONFIGS = {
    "unet": "sdxl_unet_config.json",
    "vae": "sdxl_vae_config.json",
    "text_encoder": "sdxl_text_encoder_config.json",
    "text_encoder_2": "sdxl_text_encoder_2_config.json",
}


def bundled_config(component: str) -> dict:
    return json.loads(resources.files("spoxl.resources").joinpath(SDXL_CONFIGS[component]).read_text())


def read_json_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SpoxlError(f"model config {str(path)!r} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpoxlError(f"model config {str(path)!r} is not valid JSON: {e}") from None


@dataclass(frozen=True)
class ParamCounts:
    base: int  # the UNet architecture's own parameters (2,567,463,684 for SDXL)
    total: int  # every UNet parameter (LoRA adapters included when attached)
    trainable: int  # what the optimizer updates
    largest_layer: int  # most parameters held directly by one module (ZeRO-3 gathers per module)
    frozen_components: int  # VAE + text encoders: replicated on every rank, never trained

    @property
    def frozen_unet(self) -> int:
        return self.total - self.trainable


def _module_counts(model) -> tuple[int, int, int]:
    # DeepSpeed's model_to_params de-duplicates shared tensors by data_ptr(), which is 0 for every
    # meta tensor; parameters() already yields a shared parameter once, so count from it.
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, trainable, largest


def meta_unet(unet_config: dict, lora=None):
    """The UNet of `unet_config` on the meta device; with a spoxl LoraConfig, LoRA-adapted the
    way the engine does it (peft via diffusers' add_adapter), the base frozen."""
    import torch
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError) as e:
        raise SpoxlError(f"cannot build a UNet2DConditionModel from the model config: {e}") from None
    if lora is not None and lora.enabled:
        import peft

        unet.requires_grad_(False)
        with torch.device("meta"):
            unet.add_adapter(
                peft.LoraConfig(
                    r=lora.rank,
                    lora_alpha=lora.alpha,
                    init_lora_weights="gaussian",
                    target_modules=list(lora.target_modules),
                )
            )
    return unet


def frozen_component_params(model_dir: str | Path | None) -> int:
    """VAE + the text encoders' parameter count (one for an SD1.5 folder), from the model folder's
    configs when present, else from the bundled SDXL configs."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def config_of(component: str, filename: str) -> dict:
        if model_dir is not None and (Path(model_dir) / component / filename).is_file():
            return read_json_config(Path(model_dir) / component / filename)
        return bundled_config(component)

    from spoxl.models.loading import folder_architecture

    sd15 = model_dir is not None and Path(model_dir).is_dir() and folder_architecture(Path(model_dir)) == "sd15"
    with torch.device("meta"):
        vae_cfg = {k: v for k, v in config_of("vae", "config.json").items() if not k.startswith("_")}
        models = [
            AutoencoderKL.from_config(vae_cfg),
            CLIPTextModel(CLIPTextConfig(**config_of("text_encoder", "config.json"))),
        ]
        if not sd15:  # SD1.5 has one text encoder
            models.append(CLIPTextModelWithProjection(CLIPTextConfig(**config_of("text_encoder_2", "config.json"))))
    return sum(sum(p.numel() for p in m.parameters()) for m in models)


def count_params(unet_config: dict, lora=None, model_dir: str | Path | None = None) -> ParamCounts:
    unet = meta_unet(unet_config, lora)
    total, trainable, largest = _module_counts(unet)
    lora_on = lora is not None and lora.enabled
    base = total - trainable if lora_on else total
    return ParamCounts(base, total, trainable if lora_on else total, largest, frozen_component_params(model_dir))


@dataclass(frozen=True)
class Estimate:
    stage: int
    offload_optimizer: bool
    offload_param: bool
    trained_states_gpu: int  # bytes per rank: states of the trainable parameters (DeepSpeed)
    frozen_gpu: int  # bytes per rank: frozen UNet base / reference copy / VAE + text encoders
    cpu_per_node: int  # bytes of host memory per node (DeepSpeed's estimate, offload buffers)

    @property
    def gpu_per_rank(self) -> int:
        return self.trained_states_gpu + self.frozen_gpu

    @property
    def offload_label(self) -> str:
        parts = [name for name, on in (("optimizer", self.offload_optimizer), ("params", self.offload_param)) if on]
        return "+".join(parts) if parts else "none"


def estimate(
    counts: ParamCounts,
    stage: int,
    gpus_per_node: int,
    num_nodes: int,
    *,
    offload_optimizer: bool = False,
    offload_param: bool = False,
    has_reference_copy: bool = False,
    weight_bytes: int = 2,
) -> Estimate:
    """Model-state memory per rank for one ZeRO configuration (see the module docstring)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage not in (0, 1, 2, 3):
        raise SpoxlError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    world = gpus_per_node * num_nodes
    trainable = counts.trainable
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            trainable,
            counts.largest_layer,
            num_gpus_per_node=gpus_per_node,
            num_nodes=num_nodes,
            cpu_offload=offload_optimizer,
            cpu_offload_params=offload_param and offload_optimizer,
            # spoxl builds the UNet under deepspeed.zero.Init (spoxl.engine.sharded, a folder or
            # a single file alike), so no rank materialises it whole on the host.
            zero_init=True,
        )
    elif stage == 0:
        cpu, gpu = estimate_zero2_model_states_mem_needs(trainable, 1, 1, cpu_offload=False)
        cpu *= gpus_per_node  # the estimator's host buffers are per node: one replica per rank
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            trainable, gpus_per_node, num_nodes, cpu_offload=offload_optimizer and stage == 2
        )
        if stage == 1:
            gpu += int(2 * trainable * (1 - 1 / world))  # 16-bit gradients stay whole under stage 1

    # Frozen weights: the LoRA base UNet and a full-FT reference copy follow the UNet's
    # partitioning (sharded only by stage 3, offloaded with offload_param); VAE + text encoders
    # are never partitioned.
    frozen_unet = counts.frozen_unet + (counts.total if has_reference_copy else 0)
    if stage == 3 and offload_param:
        cpu += frozen_unet * weight_bytes // num_nodes  # this node's ranks' partitions, in host memory
        frozen_unet = 0
    elif stage == 3:
        frozen_unet //= world
    frozen = (frozen_unet + counts.frozen_components) * weight_bytes
    return Estimate(stage, offload_optimizer, offload_param and stage == 3, int(gpu), int(frozen), int(cpu))


def estimates_by_stage(counts: ParamCounts, gpus_per_node: int, num_nodes: int, **kwargs) -> list[Estimate]:
    """Stages 0-3 without offload, for comparison in the preflight table."""
    return [estimate(counts, s, gpus_per_node, num_nodes, **kwargs) for s in (0, 1, 2, 3)]


def gib(n_bytes: int) -> str:
    return f"{n_bytes / GiB:.2f}"


def recipe_model_states(cfg, ds: dict, unet_config: dict, per_node: int, nodes: int):
    """(ParamCounts, the recipe's Estimate, the estimate keywords) for the recipe's ZeRO stage and
    offload, on `nodes` nodes of `per_node` ranks."""
    from spoxl.engine.ds_config import zero_stage
    from spoxl.models.loading import resolve_model_path
    from spoxl.registry import objective_class

    zero = ds.get("zero_optimization", {})
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
    offload_param = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
    model_path = resolve_model_path(cfg.model.path)
    model_dir = model_path if Path(model_path).is_dir() else None
    counts = count_params(unet_config, cfg.lora, model_dir)
    common = dict(has_reference_copy=(not cfg.lora.enabled) and objective_class(cfg.method.name).needs_reference,
                  weight_bytes=4 if cfg.deepspeed.precision == "fp32" else 2)  # fmt: skip
    chosen = estimate(counts, zero_stage(ds), per_node, nodes, offload_optimizer=offload_opt,
                      offload_param=offload_param, **common)  # fmt: skip
    return counts, chosen, common
