"""Activation memory of one training micro-step, measured on the meta device.

DeepSpeed's estimators (spoxl.cluster.memory) size the model states; what a micro-step's forward
and backward hold on top of them -- saved activations, the recomputation of a checkpointed block,
the activation gradients -- depends on resolution, batch and gradient checkpointing, and at SDXL
size it decides whether a recipe fits (1024 px, 2 rows: 4.5 GiB with checkpointing, 37 GiB
without). It is measured here, not taken from a table: the UNet (with the recipe's LoRA) runs
forward and backward on META tensors -- shapes only, no weights, no arithmetic, seconds on a login
node -- under a dispatch mode that adds up the bytes of every storage the ops create while it is
alive and records the peak.

Counted: every tensor created by the forward and backward of the policy UNet on `rows` latents
(input gradients only: parameter gradients belong to the model states). Not counted: the weights
and inputs (created before), allocator rounding and fragmentation, CUDA/NCCL workspaces, and what
a method runs besides the policy UNet (a frozen reference's forward under no_grad, which saves
nothing; NCP's frozen feature encoder; the VAE/text encoders when not cached).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from unittest.mock import patch

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class StoragePeak(TorchDispatchMode):
    """Live bytes of the storages created by ops inside the mode, and their peak. Storages that
    existed before (passed to `ignore`) are never counted, also when an op returns a view of them."""

    def __init__(self, ignore=()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: dict[int, object] = {}  # id(storage) -> weakref (None: pre-existing, ignored)
        for t in ignore:
            self._seen[id(t.untyped_storage())] = None
        self._keep_ignored = [t.untyped_storage() for t in ignore]  # keep their ids from being reused

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen[key] = weakref.ref(storage, lambda _ref, key=key, n=nbytes: self._freed(key, n))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


class _FlashLikeAttention(torch.autograd.Function):
    """scaled_dot_product_attention as a fused (flash) kernel holds memory: the output and a
    per-row fp32 log-sum-exp saved, q/k/v gradients in backward -- never the L x L weights. On the
    meta device PyTorch would take its math path (fp32 L x L attention matrices, saved), which no
    GPU (flash/memory-efficient kernels) or CPU (flash_attention_for_cpu) run holds."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    if query.device.type != "meta":
        raise RuntimeError("the flash-like attention stand-in is for meta tensors only")
    return _FlashLikeAttention.apply(query, key, value)


def unet_inputs(unet_config: dict, rows: int, resolution: int, dtype: torch.dtype, device="meta") -> dict:
    """Keyword inputs of one UNet call on `rows` latents at `resolution` px (VAE factor 8), with
    SDXL's text_time conditioning when the config has it."""
    latent = resolution // 8
    context = unet_config.get("cross_attention_dim", 2048)
    context = context[0] if isinstance(context, (list, tuple)) else context
    with torch.device(device):
        kw = {
            "sample": torch.randn(rows, unet_config.get("in_channels", 4), latent, latent, dtype=dtype),
            "timestep": torch.full((rows,), 500, dtype=torch.long),
            "encoder_hidden_states": torch.randn(rows, 77, context, dtype=dtype),
        }
        if unet_config.get("addition_embed_type") == "text_time":
            pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(rows, pooled, dtype=dtype),
                                       "time_ids": torch.randn(rows, 6, dtype=dtype)}  # fmt: skip
    return kw


def activation_peak_bytes(unet_config: dict, lora=None, *, rows: int, resolution: int,
                          dtype: torch.dtype = torch.bfloat16, gradient_checkpointing: bool = True,
                          device="meta") -> int:  # fmt: skip
    """Peak bytes of what one forward+backward of the UNet on `rows` latents creates (module
    docstring). device="cpu" runs the same measurement on real tensors (tests: meta == real)."""
    from spoxl.cluster.memory import meta_unet

    if resolution % 8 or resolution <= 0:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    unet = meta_unet(unet_config, lora)
    if device != "meta":
        unet = unet.to_empty(device=device)
        with torch.no_grad():
            for p in unet.parameters():
                p.normal_(0, 0.02)
    unet = unet.to(dtype).train()
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    kw = unet_inputs(unet_config, rows, resolution, dtype, device)
    x = kw["sample"].requires_grad_(True)
    existing = [*unet.parameters(), *unet.buffers(), *tree_flatten(kw)[0]]
    attention = _flash_like_sdpa if device == "meta" else F.scaled_dot_product_attention
    with patch.object(F, "scaled_dot_product_attention", attention), \
            StoragePeak(ignore=[t for t in existing if isinstance(t, torch.Tensor)]) as tracker:
        out = unet(**kw).sample
        loss = out.float().square().mean()
        (grad,) = torch.autograd.grad(loss, x)
        del out, loss, grad
    return tracker.peak


@dataclass(frozen=True)
class MicroStepActivations:
    method: str
    rows: int  # UNet rows through the policy's forward+backward
    resolution: int
    checkpointing: bool
    bytes: int

    def describe(self) -> str:
        return (f"one {self.method} micro-step, forward+backward of {self.rows} UNet row(s) at {self.resolution} px, "
                f"gradient checkpointing {'on' if self.checkpointing else 'off'}")


def micro_step_activations(cfg, unet_config: dict) -> MicroStepActivations:
    """The activation memory of one micro-step of the recipe (spoxl.cluster.activations)."""
    import torch

    from spoxl.cluster.activations import activation_peak_bytes
    from spoxl.registry import objective_class

    per_sample, resolution = objective_class(cfg.method.name).micro_step_unet_batch(cfg)
    resolution = resolution or 8 * int(unet_config.get("sample_size", 128))  # None: the model's native size
    rows = per_sample * cfg.train.micro_batch_size
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.deepspeed.precision]
    checkpointing = cfg.train.gradient_checkpointing
    peak = activation_peak_bytes(unet_config, cfg.lora, rows=rows, resolution=resolution, dtype=dtype,
                                 gradient_checkpointing=checkpointing)  # fmt: skip
    return MicroStepActivations(cfg.method.name, rows, resolution, checkpointing, peak)
