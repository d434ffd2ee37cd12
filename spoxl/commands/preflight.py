"""`spoxl preflight`: check a hostfile + recipe before spending a cluster allocation on them.

  spoxl preflight --hostfile hosts.txt --config configs/spo_sdxl_4node.yaml [--global-batch 256]

1. parses the DeepSpeed hostfile (line-numbered errors) -> nodes, ranks per node, world size;
2. checks the batch arithmetic micro-batch x grad accumulation x world size = global batch
   against the ds_config JSON (spoxl.engine.ds_config.build_ds_config, the same code the run
   uses) and against --global-batch when given;
3. builds the model's UNet on the meta device (no weights) from the model folder's
   unet/config.json, or the bundled SDXL base config, with the recipe's LoRA, and prints the
   per-rank memory of model states for ZeRO stages 0-3 from DeepSpeed's estimators
   (spoxl.cluster.memory), marking the recipe's stage;
4. adds the activation memory of one micro-step of the recipe (its method's UNet rows per sample x
   micro-batch, at its resolution, with its gradient checkpointing and precision), measured on the
   meta device (spoxl.cluster.activations), to the recipe's per-rank figure.

Runs on a login node: no GPU, no process group, no weights read.
"""

from __future__ import annotations

from pathlib import Path

from spoxl.errors import SpoxlError


def add_arguments(p) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--hostfile", help="DeepSpeed hostfile: one 'HOST slots=N' per line")
    where.add_argument("--num-gpus", type=int, help="single node with this many GPUs (no hostfile)")
    p.add_argument("--config", required=True, help="training recipe (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe value, as for training (repeatable)")
    p.add_argument("--global-batch", type=int, default=None,
                   help="the global batch (samples per optimizer step) you intend; checked against the recipe")
    p.add_argument("--unet-config", default=None,
                   help="UNet config.json to estimate with (default: MODEL/unet/config.json if the recipe's "
                        "model folder is readable here, else the bundled SDXL base 1.0 config)")
    p.add_argument("--no-activations", action="store_true",
                   help="skip measuring one micro-step's activation memory (meta device, ~10-20 s at SDXL size)")


def check_batch(micro: int, grad_accum: int, world: int, global_batch: int | None) -> int:
    """The global batch micro x accum x world; a SpoxlError when it cannot equal `global_batch`."""
    actual = micro * grad_accum * world
    if global_batch is None or global_batch == actual:
        return actual
    per_step = micro * world
    if global_batch <= 0 or global_batch % per_step:
        raise SpoxlError(
            f"batch arithmetic: global batch {global_batch} is impossible with micro-batch {micro} x world size "
            f"{world} = {per_step} samples per micro-step ({global_batch} is not a positive multiple of {per_step})")
    raise SpoxlError(
        f"batch arithmetic: micro-batch {micro} x grad accumulation {grad_accum} x world size {world} = {actual}, "
        f"not the global batch {global_batch}; set train.grad_accum={global_batch // per_step}")


def unet_config_for(cfg, explicit: str | None) -> tuple[dict, str]:
    """(UNet config dict, where it came from)."""
    from spoxl.cluster.memory import bundled_config, read_json_config

    if explicit:
        return read_json_config(explicit), explicit
    model = cfg.model.path
    from spoxl.models.loading import BUILT_IN, resolve_model_path

    if model.split(":", 1)[0] in BUILT_IN:
        from spoxl.engine.sharded import unet_source

        return unet_source(model)[0], f"{model.split(':', 1)[0]} (built in)"

    folder_config = Path(resolve_model_path(model)) / "unet" / "config.json"
    if folder_config.is_file():
        return read_json_config(folder_config), str(folder_config)
    return bundled_config("unet"), f"bundled SDXL base 1.0 config ({model} is not readable here)"


def _hosts_from(args):
    from spoxl.cluster.hostfile import Host, parse_hostfile

    if args.hostfile:
        return parse_hostfile(args.hostfile), args.hostfile
    if args.num_gpus < 1:
        raise SpoxlError(f"--num-gpus must be >= 1, got {args.num_gpus}")
    return [Host("localhost", args.num_gpus)], "--num-gpus"


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def run(args) -> int:
    import os

    # Preflight only does arithmetic: keep DeepSpeed from probing for a GPU (and warning on stdout
    # about falling back to CPU) on a login node.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from spoxl.cluster.hostfile import world_size
    from spoxl.cluster.activations import micro_step_activations
    from spoxl.cluster.memory import estimates_by_stage, gib, recipe_model_states
    from spoxl.config import load_config
    from spoxl.engine.ds_config import build_ds_config, zero_stage

    hosts, host_source = _hosts_from(args)
    cfg = load_config(args.config, args.overrides)
    world = world_size(hosts)
    nodes = len(hosts)
    per_node = max(h.slots for h in hosts)

    # Batch arithmetic: the intended global batch first (the clearer message), then the ds JSON.
    global_batch = check_batch(cfg.train.micro_batch_size, cfg.train.grad_accum, world, args.global_batch)
    ds = build_ds_config(cfg, world)
    stage = zero_stage(ds)

    unet_config, unet_source = unet_config_for(cfg, args.unet_config)
    counts, chosen, common = recipe_model_states(cfg, ds, unet_config, per_node, nodes)
    has_reference_copy = common["has_reference_copy"]
    rows = estimates_by_stage(counts, per_node, nodes, **common)
    if chosen.offload_optimizer or chosen.offload_param:
        rows.append(chosen)

    uneven = len({h.slots for h in hosts}) > 1
    names = ", ".join(h.name for h in hosts[:4]) + (", ..." if nodes > 4 else "")
    print(f"hostfile   {host_source}: {nodes} node(s), {world} ranks ({names})"
          + (f"; slots differ, estimates assume {per_node} per node" if uneven else ""))
    print(f"batch      micro-batch {cfg.train.micro_batch_size} x grad accumulation {cfg.train.grad_accum} x "
          f"world size {world} = global batch {global_batch}: OK")
    if cfg.lora.enabled:
        training = f"LoRA rank {cfg.lora.rank} on {', '.join(cfg.lora.target_modules)}"
    else:
        training = "full fine-tuning" + (" + frozen reference copy" if has_reference_copy else "")
    print(f"model      UNet {counts.base:,} params ({_human(counts.base)}) from {unet_source}")
    print(f"training   {training}: {counts.trainable:,} trainable params ({_human(counts.trainable)}); "
          f"largest layer {counts.largest_layer:,}; VAE + text encoders {_human(counts.frozen_components)} frozen")
    print(f"precision  {cfg.deepspeed.precision}; method {cfg.method.name}; ZeRO stage {stage} "
          f"from {cfg.deepspeed.config}")
    print()
    print("Per-rank memory of model states, GiB (DeepSpeed estimators; "
          + ("activations not measured: --no-activations)" if args.no_activations else "activations below)"))
    header = f"{'':2}{'ZeRO':>4}  {'offload':<17}{'trained states':>15}{'frozen weights':>15}" \
             f"{'GPU per rank':>14}{'CPU per node':>14}"
    print(header)
    for e in rows:
        mark = "*" if (e.stage, e.offload_optimizer, e.offload_param) == (
            chosen.stage, chosen.offload_optimizer, chosen.offload_param) else " "
        print(f"{mark:2}{e.stage:>4}  {e.offload_label:<17}{gib(e.trained_states_gpu):>15}{gib(e.frozen_gpu):>15}"
              f"{gib(e.gpu_per_rank):>14}{gib(e.cpu_per_node):>14}")
    print("* = this recipe. trained states: 16-bit weights + gradients + fp32 master + Adam moments of the "
          "trainable parameters; frozen weights: "
          + ("the LoRA base UNet" if cfg.lora.enabled else "the reference copy" if has_reference_copy else "")
          + (", " if cfg.lora.enabled or has_reference_copy else "")
          + "VAE and text encoders. Not included: CUDA/NCCL workspaces, allocator fragmentation, and models a "
          "method brings (e.g. SPO's preference model).")
    if cfg.deepspeed.precision == "fp32":
        print("note: DeepSpeed's estimators assume 16-bit training weights; fp32 training needs more.")
    if not args.no_activations:
        print()
        activations = micro_step_activations(cfg, unet_config)
        print(f"activations  {activations.describe()}: {gib(activations.training_bytes)} GiB "
              "(measured on the meta device, attention as a flash kernel holds it)")
        if activations.sampling is not None:
            rows, images = activations.sampling
            print(f"sampling     no_grad forward of {rows} UNet row(s), then the VAE decode of {images} image(s) "
                  f"({cfg.model.vae_dtype} VAE): {gib(activations.sampling_bytes)} GiB at the larger")
        print(f"per rank     this recipe's model states {gib(chosen.gpu_per_rank)} + activations "
              f"{gib(activations.bytes)} = {gib(chosen.gpu_per_rank + activations.bytes)} GiB")
    return 0
