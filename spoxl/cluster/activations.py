"""Activation memory of one training micro-step, measured on the meta device.

DeepSpeed's estimators (spoxl.cluster.memory) size the model states; what a micro-step's forward
and backward hold on top of them -- saved activations, the recomputation of a checkpointed block,
the activation gradients -- depends on resolution, batch and gradient checkpointing, and at SDXL
size it decides whether a recipe fits (1024 px, 2 rows: 1.2 GiB with checkpointing, 11.7 GiB
without; SPO's sampling round decodes its pool through the fp32 VAE: 3 GiB per 1024 px image). It is measured here, not taken from a table: the UNet (with the recipe's LoRA) runs
forward and backward on META tensors -- shapes only, no weights, no arithmetic, seconds on a login
node -- under a dispatch mode that adds up the bytes of every storage the ops create while it is
alive and records the peak.

Counted: every tensor created by the forward and backward of the policy UNet on `rows` latents
(input gradients only: parameter gradients belong to the model states). Not counted: the weights
and inputs (created before), allocator rounding and fragmentation, CUDA/NCCL workspaces, and what
a method runs besides the policy UNet (a frozen reference's forward under no_grad, which saves
nothing; NCP's frozen feature encoder; the text encoders). A method that samples (SPO) also states
its sampling batch, measured the same way under no_grad: the UNet's CFG forward on the pool and
the VAE decode of the pool's images; the larger of the two phases is the figure.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from unittest.mock import patch

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class StoragePeak(TorchDispatchMode):
    """Live bytes of the storages created by ops inside the mode, and their peak. Storages that
    existed before (passed to `ignore`) are never counted, also when an op returns a view of them;
    a counted storage that an op grows (resize_, out= into an empty tensor) is counted at its new size."""

    def __init__(self, ignore=()):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._size: dict[int, int] = {}  # id(storage) -> bytes counted for it
        self._refs: dict[int, object] = {}  # id(storage) -> weakref that uncounts it when freed
        self._ignored = [t.untyped_storage() for t in ignore]  # kept alive: their ids are never reused
        self._ignored_ids = {id(st) for st in self._ignored}

    def _freed(self, key: int) -> None:
        self.live -= self._size.pop(key, 0)
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten((out, args, kwargs))[0]:  # args/kwargs too: in-place growth, out=
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._ignored_ids:
                continue
            if key not in self._refs:
                if not any(t is o for o in tree_flatten(out)[0]):
                    continue  # an input created before the mode (or outside it): not ours to count
                self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._freed(key))
                self._size[key] = 0
            grown = storage.nbytes() - self._size[key]
            if grown:
                self._size[key] += grown
                self.live += grown
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


def no_grad_peak_bytes(module_fn, existing) -> int:
    """Peak bytes a no_grad call creates (module_fn() under StoragePeak, `existing` not counted)."""
    with torch.no_grad(), patch.object(F, "scaled_dot_product_attention", _flash_like_sdpa), \
            StoragePeak(ignore=[t for t in existing if isinstance(t, torch.Tensor)]) as tracker:
        module_fn()
    return tracker.peak


def sampling_peak_bytes(unet_config: dict, lora, *, unet_rows: int, images: int, resolution: int,
                        dtype: torch.dtype, vae_dtype: torch.dtype, vae_config: dict | None = None) -> int:  # fmt: skip
    """max(a no_grad UNet forward on `unet_rows` latents, the VAE decode of `images` latents), on
    the meta device: the two phases of a sampling step never overlap."""
    from diffusers import AutoencoderKL

    from spoxl.cluster.memory import bundled_config, meta_unet

    unet = meta_unet(unet_config, lora).to(dtype).eval()
    kw = unet_inputs(unet_config, unet_rows, resolution, dtype)
    unet_peak = no_grad_peak_bytes(lambda: unet(**kw), [*unet.parameters(), *unet.buffers(), *tree_flatten(kw)[0]])
    config = {k: v for k, v in (vae_config or bundled_config("vae")).items() if not k.startswith("_")}
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config).to(vae_dtype).eval()
        z = torch.randn(images, config.get("latent_channels", 4), resolution // 8, resolution // 8, dtype=vae_dtype)
    vae_peak = no_grad_peak_bytes(lambda: vae.decode(z), [*vae.parameters(), *vae.buffers(), z])
    return max(unet_peak, vae_peak)


@dataclass(frozen=True)
class MicroStepActivations:
    method: str
    rows: int  # UNet rows through the policy's forward+backward
    resolution: int
    checkpointing: bool
    training_bytes: int
    sampling: tuple[int, int] | None = None  # (UNet rows, images per VAE call) of a sampling step
    sampling_bytes: int = 0

    @property
    def bytes(self) -> int:
        return max(self.training_bytes, self.sampling_bytes)

    def describe(self) -> str:
        text = (f"one {self.method} micro-step, forward+backward of {self.rows} UNet row(s) at {self.resolution} px, "
                f"gradient checkpointing {'on' if self.checkpointing else 'off'}")
        return text


def micro_step_activations(cfg, unet_config: dict) -> MicroStepActivations:
    """The activation memory of one micro-step of the recipe, and of its sampling step if it samples."""
    from spoxl.engine.ds_config import compute_dtype
    from spoxl.registry import objective_class

    objective = objective_class(cfg.method.name)
    per_sample, resolution = objective.micro_step_unet_batch(cfg)
    resolution = resolution or 8 * int(unet_config.get("sample_size", 128))  # None: the model's native size
    rows = math.ceil(per_sample * cfg.train.micro_batch_size - 1e-9)  # per_sample may be fractional (SPO's anchor subset)
    dtype = compute_dtype(cfg.deepspeed.precision)
    checkpointing = cfg.train.gradient_checkpointing
    training = activation_peak_bytes(unet_config, cfg.lora, rows=rows, resolution=resolution, dtype=dtype,
                                     gradient_checkpointing=checkpointing)  # fmt: skip
    sampling = objective.sampling_batch(cfg)
    sampling_bytes = 0
    if sampling is not None:
        from spoxl.sampling import decode_chunk

        # the images go through the VAE a chunk at a time (sampling.decode_latents): at most 16,
        # fewer at high resolution
        sampling = (sampling[0], min(sampling[1], decode_chunk(resolution, resolution)))
        vae_dtype = torch.float32 if cfg.model.vae_dtype == "fp32" else dtype
        sampling_bytes = sampling_peak_bytes(unet_config, cfg.lora, unet_rows=sampling[0], images=sampling[1],
                                             resolution=resolution, dtype=dtype, vae_dtype=vae_dtype)  # fmt: skip
    return MicroStepActivations(cfg.method.name, rows, resolution, checkpointing, training, sampling, sampling_bytes)
