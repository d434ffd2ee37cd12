"""SPO on SDXL for 24, 40 and 80 GB cards: the recipes, and what `spoxl preflight` predicts for them.

Each recipe is configs/spo_sdxl.yaml (1024 px, LoRA rank 64 or full fine-tuning, bf16) with the
overrides below, on one node of 8 cards, at the same global batch (micro-batch x grad_accum x 8 =
32 pairs). The predicted per-rank figure is preflight's: DeepSpeed's model-state estimate for the
recipe's ZeRO stage and offload (spoxl.cluster.memory) plus one micro-step's activations measured on
the meta device (spoxl.cluster.activations) plus SPO's step-aware preference model (PickScore's
CLIP ViT-H/14, kept in fp32 as spoxl runs it). On top of it a card needs the CUDA context, NCCL
and cuDNN/cuBLAS workspaces and allocator slack: the recipes keep CUDA_HEADROOM_GIB free.

    python -m spoxl.cluster.cards      # prints the markdown table of docs/training.md
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 2**30
CUDA_HEADROOM_GIB = 3.0  # context (~0.5-1 GiB), NCCL buffers, workspaces, fragmentation
# A "24/40/80 GB" card holds that many GiB (an A100 80GB: 81,920 MiB); every figure here is GiB.
RANKS_PER_NODE = 8
BASE_RECIPE = "configs/spo_sdxl.yaml"


@dataclass(frozen=True)
class CardRecipe:
    card_gb: int
    name: str
    overrides: tuple[str, ...]
    why: str


CARD_RECIPES = [
    CardRecipe(24, "LoRA", ("deepspeed.config=zero2", "train.micro_batch_size=1", "train.grad_accum=4",
                            "train.gradient_checkpointing=true", "method.prompts_per_rank=1", "model.vae_dtype=compute"),
               "the frozen base replicated in bf16; checkpointing, and a pool of 2 decoded by a bf16 VAE "
               "(the fp32 decode of 4 images at 1024 px alone takes 12 GiB)"),
    CardRecipe(24, "full", ("lora.enabled=false", "deepspeed.config=zero3", "train.micro_batch_size=1",
                            "train.grad_accum=4", "train.gradient_checkpointing=true", "method.prompts_per_rank=1",
                            "model.vae_dtype=compute"),
               "ZeRO-3 shards policy, reference copy and optimizer over the 8 cards; the 24 GB LoRA sampling settings"),
    CardRecipe(40, "LoRA", ("deepspeed.config=zero2", "train.micro_batch_size=1", "train.grad_accum=4",
                            "train.gradient_checkpointing=false"),
               "no checkpointing (faster): one pair's 4 UNet rows keep their activations"),
    CardRecipe(40, "full", ("lora.enabled=false", "deepspeed.config=zero2", "train.micro_batch_size=1",
                            "train.grad_accum=4", "train.gradient_checkpointing=true"),
               "ZeRO-2: optimizer and gradients sharded, the bf16 policy and reference copy whole (no gathers)"),
    CardRecipe(80, "LoRA", ("deepspeed.config=zero2", "train.micro_batch_size=2", "train.grad_accum=2",
                            "train.gradient_checkpointing=false"),
               "two pairs per micro-step without checkpointing"),
    CardRecipe(80, "full", ("lora.enabled=false", "deepspeed.config=zero2", "train.micro_batch_size=1",
                            "train.grad_accum=4", "train.gradient_checkpointing=false"),
               "ZeRO-2 without checkpointing"),
]


@dataclass(frozen=True)
class CardPrediction:
    recipe: CardRecipe
    model_states: int  # bytes per rank (DeepSpeed's estimators, the recipe's stage and offload)
    activations: int  # bytes: the larger of one micro-step and one sampling step, meta device
    preference_model: int  # bytes: SPO's step-aware preference model
    host_per_node: int  # bytes of host memory per node (offload buffers), DeepSpeed's estimate

    @property
    def per_rank(self) -> int:
        return self.model_states + self.activations + self.preference_model

    @property
    def fits(self) -> bool:
        return self.per_rank + CUDA_HEADROOM_GIB * GiB <= self.recipe.card_gb * GiB


def step_aware_preference_model_params() -> int:
    """PickScore_v1's CLIP ViT-H/14 (the SDXL step-aware preference model's backbone), counted on
    the meta device from its public architecture."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                         hidden_act="gelu", max_position_embeddings=77, vocab_size=49408),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16, num_hidden_layers=32,
                           patch_size=14, image_size=224, hidden_act="gelu"),
        projection_dim=1024,
    )  # fmt: skip
    with torch.device("meta"):
        return sum(p.numel() for p in CLIPModel(config).parameters())


def predict(recipe: CardRecipe, *, root=None) -> CardPrediction:
    from pathlib import Path

    from spoxl.cluster.activations import micro_step_activations
    from spoxl.cluster.memory import bundled_config, recipe_model_states
    from spoxl.config import load_config
    from spoxl.engine.ds_config import build_ds_config

    root = Path(root) if root else Path(__file__).resolve().parents[2]
    cfg = load_config(root / BASE_RECIPE, list(recipe.overrides))
    ds = build_ds_config(cfg, RANKS_PER_NODE)
    unet_config = bundled_config("unet")
    _, states, _ = recipe_model_states(cfg, ds, unet_config, RANKS_PER_NODE, 1)
    activations = micro_step_activations(cfg, unet_config)
    return CardPrediction(recipe, states.gpu_per_rank, activations.bytes, 4 * step_aware_preference_model_params(),
                          states.cpu_per_node)  # fmt: skip


def markdown_table(predictions: list[CardPrediction]) -> str:
    gb = lambda n: f"{n / GiB:.1f}"  # noqa: E731
    lines = ["| card | training | overrides of configs/spo_sdxl.yaml | model states (GiB) | activations (GiB) "
             "| preference model (GiB) | predicted per rank | host RAM per node |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in predictions:
        r = p.recipe
        sets = " ".join(f"`{o}`" for o in r.overrides)
        lines.append(f"| {r.card_gb} GB | {r.name} | {sets} | {gb(p.model_states)} | {gb(p.activations)} | "
                     f"{gb(p.preference_model)} | **{gb(p.per_rank)} GiB** | {gb(p.host_per_node)} GiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(markdown_table([predict(r) for r in CARD_RECIPES]))
