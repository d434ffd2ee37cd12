"""From a Config to a running DeepSpeed engine around the SDXL UNet (plus what objectives need).

  init_distributed(cfg)  -> (rank, world_size, device): gloo + DS_ACCELERATOR=cpu without a GPU,
                            NCCL on GPUs, process-group timeout from the recipe;
  build_training(cfg, objective) -> Trainer (spoxl.engine.trainer): components loaded (under ZeRO-3
                            the UNet partitioned from construction: spoxl.engine.sharded), VAE/text encoders frozen in
                            the compute dtype and kept OUTSIDE DeepSpeed; the UNet with LoRA
                            (peft, the diffusers way) or fully trainable; optimizer (torch AdamW or
                            bitsandbytes AdamW8bit), LR warmup/schedule; deepspeed.initialize;
                            the reference model if the objective needs one.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from datetime import timedelta

import torch

from spoxl import rng
from spoxl.errors import SpoxlError


def use_cpu() -> bool:
    """No usable CUDA device, or DS_ACCELERATOR=cpu forced: DeepSpeed's CPU accelerator + gloo."""
    forced = os.environ.get("DS_ACCELERATOR")
    if forced:
        return forced == "cpu"
    return not torch.cuda.is_available()


def _ensure_process_env() -> None:
    """A single process started without a launcher still needs the torch.distributed rendezvous env."""
    import socket

    def free_port() -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return str(s.getsockname()[1])

    if os.environ.get("SPOXL_SELF_RENDEZVOUS") == "1" and os.environ.get("WORLD_SIZE") == "1":
        # Inherited from a single-process parent (e.g. a test process) whose group holds that port.
        os.environ["MASTER_PORT"] = free_port()
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = os.environ.get("MASTER_PORT") or free_port()
    os.environ["SPOXL_SELF_RENDEZVOUS"] = "1"


def init_distributed(cfg=None, *, timeout: timedelta | None = None) -> tuple[int, int, torch.device]:
    """Start (or join) the process group; returns (rank, world_size, device). The timeout is the
    recipe's train.dist_timeout_minutes unless given (spoxl.train joins with a short one, without a
    recipe, only to report an error)."""
    cpu = use_cpu()
    if cpu:
        # Must be set before deepspeed picks its accelerator (cached on first use).
        os.environ["DS_ACCELERATOR"] = "cpu"
    _ensure_process_env()
    import deepspeed
    import torch.distributed as dist

    if not cpu:
        # Bind this rank's GPU before NCCL starts (otherwise every rank's communicator may
        # touch GPU 0).
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if cpu:
        skip_shared_memory_allreduce_op()
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="gloo" if cpu else "nccl",
            timeout=timeout or timedelta(minutes=cfg.train.dist_timeout_minutes),
            dist_init_required=True,
        )
    rank, world = dist.get_rank(), dist.get_world_size()
    if cpu:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return rank, world, device


def skip_shared_memory_allreduce_op() -> None:
    """Keep DeepSpeed from JIT-building and initialising its CPU shared-memory all-reduce op.

    Only DeepSpeed's inference all-reduce uses it; training runs gloo collectives. Each init
    creates a ~64 MB /dev/shm segment per rank that DeepSpeed never unlinks: hundreds of test and
    demo runs filled 21 GB of RAM on a dev machine until processes stalled. Building it costs
    about a minute on a fresh machine, and its initialisation busy-waits in C++ (holding the GIL)
    until every local peer has created its segment, so a slow peer freezes a rank, heartbeat thread
    included. DeepSpeed 0.19 caches `deepspeed.ops.__compatible_ops__` in the module precisely so
    that edits to it persist; marking the op incompatible makes `build_shm_op` return None.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ---------------------------------------------------------------------------------------------
# Model pieces


def attach_lora(unet, lora_cfg) -> None:
    """Freeze the UNet and add a peft LoRA adapter (the diffusers way); only the adapter trains."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    try:
        unet.add_adapter(LoraConfig(
            r=lora_cfg.rank,
            lora_alpha=lora_cfg.alpha,
            lora_dropout=lora_cfg.dropout,
            init_lora_weights="gaussian",
            target_modules=list(lora_cfg.target_modules),
        ))
    except ValueError as e:
        raise SpoxlError(f"lora.target_modules {lora_cfg.target_modules} do not match the UNet: "
                         f"{str(e).splitlines()[0]}") from None
    # peft leaves adapter weights trainable; make sure nothing else is.
    for name, p in unet.named_parameters():
        p.requires_grad_("lora_" in name)


def build_optimizer(params, cfg):
    o = cfg.optim
    kwargs = dict(lr=cfg.train.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    if o.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except Exception as e:  # an import failure of a native library can be any type
            raise SpoxlError(f"optim.name=adamw8bit needs bitsandbytes, which failed to import: {e}") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    raise SpoxlError(f"unknown optimizer {o.name!r}")


def lr_lambda(cfg):
    """Multiplier of train.lr at optimizer step `step`: linear warmup, then constant/linear/cosine."""
    t = cfg.train
    warmup, total, schedule = t.warmup_steps, t.max_steps, t.lr_schedule

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _reference_ds_config(ds: dict) -> dict:
    """A no-optimizer ZeRO-3 config for the frozen reference (sharded like the policy)."""
    zero = {k: v for k, v in ds["zero_optimization"].items() if k != "offload_optimizer"}
    ref = {k: ds[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                              "train_batch_size", "bf16", "fp16", "steps_per_print") if k in ds}
    ref["zero_optimization"] = zero
    return ref


def build_reference(unet_frozen_copy, ds: dict, device, dtype):
    """Full fine-tuning's reference: a frozen UNet copy. Under ZeRO-3 it is a DeepSpeed engine
    without an optimizer, so its weights are partitioned like the policy's; otherwise a plain
    module in the compute dtype."""
    from spoxl.engine.ds_config import zero_stage

    ref = unet_frozen_copy.requires_grad_(False).eval()
    if zero_stage(ds) == 3:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=ref, config=_reference_ds_config(ds), dist_init_required=False)
        engine.eval()
        return engine
    return ref.to(device=device, dtype=dtype)


def build_training(cfg, objective, *, components=None):
    """Everything up to the first step: returns the run's spoxl.engine.trainer.Trainer."""
    import deepspeed

    from spoxl.engine.ds_config import build_ds_config, compute_dtype, zero_stage
    from spoxl.engine.host_memory import bound_host_heap
    from spoxl.engine.trainer import Trainer
    from spoxl.models.loading import load_sdxl

    if cfg.train.host_mmap_threshold_mib is not None:  # before anything large is allocated
        if not bound_host_heap(cfg.train.host_mmap_threshold_mib) and int(os.environ.get("RANK", "0")) == 0:
            # Not glibc (musl, macOS): the setting cannot be applied; say so rather than pretend.
            print(f"[spoxl] warning: train.host_mmap_threshold_mib={cfg.train.host_mmap_threshold_mib} not applied: "
                  "this C library has no glibc mallopt (host memory may grow as with glibc's defaults)",
                  file=sys.stderr, flush=True)  # fmt: skip
    rank, world, device = init_distributed(cfg)
    ds = build_ds_config(cfg, world, on_cpu=device.type == "cpu")
    dtype = compute_dtype(cfg.deepspeed.precision)

    # Same seed on every rank for everything that builds weights (LoRA init, the tiny model):
    # ZeRO-3 partitions each rank's own copy, so the copies must agree.
    torch.manual_seed(rng.seed(rng.WEIGHTS, cfg.run.seed))
    build_sharded = None  # ZeRO-3: builds another partitioned UNet (full fine-tuning's reference)
    if components is None and zero_stage(ds) == 3:
        # Partitioned from construction: no rank ever holds the whole UNet (spoxl.engine.sharded).
        from spoxl.engine.sharded import load_components_sharded

        components, build_sharded = load_components_sharded(cfg, ds)
    elif components is None:
        components = load_sdxl(cfg.model.path, unet_file=cfg.model.unet_file, vae_file=cfg.model.vae_file,
                               variant=cfg.model.variant, vae_path=cfg.model.vae_path)
    # Frozen parts: compute dtype (the VAE fp32 unless model.vae_dtype says compute), on the
    # device, never seen by DeepSpeed (so never partitioned).
    for name in components.frozen_part_names():
        part = getattr(components, name)
        part_dtype = torch.float32 if name == "vae" and cfg.model.vae_dtype == "fp32" else dtype
        # Skip no-op casts: diffusers warns on every .to(dtype) even when nothing changes.
        if next(part.parameters()).dtype != part_dtype:
            part.to(dtype=part_dtype)
        offloaded = cfg.model.offload_text_encoders and name.startswith("text_encoder")
        part.to(device="cpu" if offloaded else device)
    if cfg.model.offload_text_encoders:
        components.text_encoder_device = device  # visited only while encoding (text_encoders_ready)
    components.freeze_frozen_parts()

    unet = components.unet
    reference = None
    if cfg.lora.enabled:
        attach_lora(unet, cfg.lora)
    else:
        unet.requires_grad_(True)
        if objective.needs_reference:
            # ZeRO-3: a second partitioned build (a deepcopy of partitioned parameters copies
            # nothing); otherwise a copy of the base weights before training moves them.
            reference = build_sharded() if build_sharded is not None else copy.deepcopy(unet)
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()

    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise SpoxlError("nothing to train: the UNet has no trainable parameters")
    optimizer = build_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=unet, optimizer=optimizer, lr_scheduler=scheduler, config=ds, dist_init_required=False)
    if reference is not None:
        reference = build_reference(reference, ds, device, dtype)

    generator = rng.generator(rng.RANK_STREAM, cfg.run.seed, rank=rank, device=device)
    # Per-rank global RNG (dropout etc.): ranks see different data, so they may differ here.
    torch.manual_seed(rng.seed(rng.RANK_STREAM, cfg.run.seed, rank=rank))
    components.unet = engine.module
    return Trainer(
        config=cfg,
        objective=objective,
        components=components,
        engine=engine,
        reference_engine=reference,
        rank=rank,
        world_size=world,
        device=device,
        dtype=dtype,
        generator=generator,
        lora=cfg.lora.enabled,
    )
