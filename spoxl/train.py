"""Training entry point, one process per rank:

    deepspeed --num_gpus N --module spoxl.train --config configs/tiny_sft.yaml [--set a.b=c ...] [--resume]

(on CPU: `deepspeed --num_gpus 2` gives 2 CPU ranks; `spoxl train ...` wraps this command; the
deepspeed launcher spells the module flag `--module`, it has no `-m`). Without a launcher it runs
as a single rank.

Every rank runs under the job-wide failure watchdog (spoxl.cluster.watchdog): when any rank dies
(exception, SIGKILL, lost node) every rank exits non-zero within the watchdog timeout, naming the
failed rank, instead of waiting in a collective.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m spoxl.train", description="Train the SDXL UNet with DeepSpeed.")
    p.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.lr=1e-5")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    return p


def check_recipe(config_path, overrides, world_size: int | None):
    """Everything that can be checked before a process group or a model exists: the config,
    the ds_config merged at this world size, the objective's data. Returns (config, objective)."""
    from spoxl.config import load_config
    from spoxl.engine.ds_config import build_ds_config
    from spoxl.engine.setup import use_cpu
    from spoxl.registry import build_objective

    cfg = load_config(config_path, overrides)
    from spoxl.paths import check_can_create

    check_can_create(cfg.run.output_dir, "run.output_dir")
    if world_size is not None:  # unknown before launch on multi-node runs: the ranks check it then
        build_ds_config(cfg, world_size, on_cpu=use_cpu())
    objective = build_objective(cfg)
    objective.check(cfg)
    return cfg, objective


def refuse_to_overwrite(cfg) -> None:
    """A fresh run (no --resume) in a run dir that already holds checkpoints would mix its
    checkpoints with the old run's, and pruning by step number would delete the new ones. Checked
    before any process group exists; every rank sees the same run dir (a rank that does not, on a
    multi-node job without a shared filesystem, is stopped by the watchdog when rank 0 exits)."""
    from spoxl.engine import checkpoint
    from spoxl.errors import SpoxlError

    tag = checkpoint.latest_tag(cfg.checkpoint_dir)
    if tag is not None:
        step = int(tag.split("_")[-1])
        raise SpoxlError(f"run.output_dir {cfg.run.output_dir} already holds checkpoints up to step {step} "
                         f"({cfg.checkpoint_dir}): pass --resume to continue it, or choose a fresh run.output_dir")


def run(args) -> int:
    from spoxl.config import dump_yaml
    from spoxl.engine.logging import MetricsLogger, flatten
    from spoxl.engine.setup import build_training

    cfg, objective = check_recipe(args.config, args.overrides, int(os.environ.get("WORLD_SIZE", "1")))
    if not args.resume:
        refuse_to_overwrite(cfg)
    trainer = build_training(cfg, objective)
    out = Path(cfg.run.output_dir)
    logger = MetricsLogger(out, trainer.rank, tensorboard=cfg.logging.tensorboard)
    trainer.logger = logger
    try:
        if trainer.rank == 0:
            from spoxl.evaluation import write_atomic

            write_atomic(out / "config.yaml", dump_yaml(cfg))
        logger.info(f"method {cfg.method.name}, {'LoRA' if cfg.lora.enabled else 'full fine-tuning'}, "
                    f"{trainer.world_size} rank(s), {cfg.deepspeed.config} ({cfg.deepspeed.precision}), "
                    f"device {trainer.device}")
        objective.setup(trainer.view)
        if cfg.ema.enabled:
            from spoxl.engine.ema import EMA

            trainer.ema = EMA(trainer.engine, decay=cfg.ema.decay, warmup=cfg.ema.warmup,
                              every_n_steps=cfg.ema.every_n_steps)  # fmt: skip
        if args.resume:
            tag = trainer.resume()
            logger.info(f"resumed from {cfg.checkpoint_dir / tag} at step {trainer.global_step}" if tag
                        else f"--resume: no checkpoint in {cfg.checkpoint_dir}, starting fresh")
        last = trainer.train()
        if cfg.export.at_end:
            from spoxl.engine.export import export_all

            formats = cfg.export.formats or (("diffusers", "kohya") if cfg.lora.enabled else ("unet",))
            paths = export_all(trainer.engine, out / "export", formats=tuple(formats), ema=trainer.ema,
                               lora_dtype=cfg.export.lora_dtype)
            logger.info("exported " + ", ".join(str(p) for p in paths.values()))
        if trainer.rank == 0:
            write_summary(out, cfg, last, trainer.global_step)
        logger.hparams(flatten(cfg.to_dict()), {k.split("/")[-1]: v for k, v in last.items()
                                                 if k in ("train/loss", "train/grad_norm")})
        logger.info(f"done: {trainer.global_step} steps, run dir {out}")
    finally:
        logger.close()
    return 0


def write_summary(out: Path, cfg, last: dict, global_step: int) -> None:
    """<run>/summary.json: what the run cost and where it ended (read by benchmarks/alignment.py)."""
    import json

    from spoxl.evaluation import write_atomic

    keys = ("train/steps", "train/seconds", "train/unet_samples", "memory/peak_rss_mib", "memory/cuda_peak_mib",
            "train/loss", "train/nonfinite_steps")
    summary = {"method": cfg.method.name, "global_step": global_step,
               **{k.split("/")[-1]: last[k] for k in keys if k in last}}
    write_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")


def main(argv=None) -> int:
    from spoxl.cluster.watchdog import watch_job

    args = build_parser().parse_args(argv)
    try:
        with watch_job():
            code = _run_reporting_errors(args)
            if code:
                raise SystemExit(code)  # watch_job records a non-zero exit as this rank's failure
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:
        from spoxl.cluster.watchdog import is_communication_error, reported_failure

        if is_communication_error(e):
            # A peer went away: when the watchdog printed the line that names it (or this error),
            # a traceback of the collective adds nothing. Without a watchdog line (one rank, the
            # watchdog off, or a rendezvous that never formed) say it in one line here.
            if not reported_failure():
                rank = os.environ.get("RANK", "0")
                print(f"spoxl train: error{'' if rank == '0' else f' (rank {rank})'}: communication failed: "
                      f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", file=sys.stderr, flush=True)  # fmt: skip
            return 1
        raise  # anything else is a bug in spoxl or a library: keep its traceback
    _shutdown()
    return 0


def _run_reporting_errors(args) -> int:
    from spoxl.errors import SharedError, SpoxlError

    try:
        return run(args)
    except SpoxlError as e:
        from spoxl.cluster.watchdog import note_error

        rank = os.environ.get("RANK", "0")
        note_error(str(e))  # the watchdog's job-wide failure line carries it, whichever rank failed first
        line = f"spoxl train: error{'' if rank == '0' else f' (rank {rank})'}: {e}"
        joined = _join_group_to_report(line)
        # Usually every rank hits the same config/data error: rank 0 prints it; another rank prints
        # its own only when rank 0 has not failed (a rank that joined only to report gives rank 0 a
        # few seconds to say so): an error found on rank 1 alone is never lost. An error every rank
        # raised together (SharedError) is rank 0's to print, always.
        if rank == "0" or (not isinstance(e, SharedError) and not _rank0_failed(wait_s=5.0 if joined else 0.0)):
            print(line, file=sys.stderr, flush=True)
        # No destroy_process_group here: with a peer already gone it can block; exiting is enough.
        return 2


def _join_group_to_report(line: str) -> bool:
    """A rank that fails a check before the process group exists (its node's copy of a file is
    missing or different, on a cluster without a shared filesystem) joins the group anyway, only
    to put its error in the job's failure record on its way out: otherwise its peers, already
    waiting in the rendezvous or in a first collective, would wait out the whole process-group
    timeout and never learn why. The single-node `spoxl train` runs these checks before launching,
    so this matters for jobs started by the launcher itself (launch/per_node.sh, SLURM). Joining
    is bounded by the watchdog's timeout, and by a hard deadline after it (a NCCL communicator
    set up eagerly can block past any store timeout): then `line` is printed and the rank exits 2,
    so the message is never lost. True when this call joined the group (the error came before it)."""
    import threading

    import torch.distributed as dist

    from spoxl.cluster.watchdog import settings_from_env, start_now

    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or "MASTER_ADDR" not in os.environ:
        return False
    enabled, timeout_s, _ = settings_from_env()
    if not enabled:
        return False
    joined = False
    if not dist.is_initialized():
        from datetime import timedelta

        from spoxl.engine.setup import init_distributed

        guard = threading.Timer(timeout_s + 15.0, _give_up, args=(line,))
        guard.daemon = True
        guard.start()
        try:
            init_distributed(timeout=timedelta(seconds=timeout_s))
            joined = True
        except Exception:  # no peer came, or the network is the problem: exit with the error as it is
            return False
        finally:
            guard.cancel()
    start_now()
    return joined


def _give_up(line: str) -> None:
    """The report could not be delivered in time: say it here and end the rank."""
    print(line, file=sys.stderr, flush=True)
    os._exit(2)


def _rank0_failed(wait_s: float = 0.0) -> bool:
    """Whether rank 0 recorded a failure in the job's watchdog store (False when unknown), waiting
    up to wait_s for it to do so."""
    import time

    from spoxl.cluster.watchdog import recorded_failure

    deadline = time.monotonic() + wait_s
    while True:
        if (recorded_failure() or "").startswith("rank 0 "):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    exit_code = main()
    # Skip interpreter teardown: with DeepSpeed and the gloo group loaded it takes ~8 s on CPU
    # (every rank, every run), and after an error a peer that is gone can stall it longer. All
    # our files (checkpoints, exports, logs, TensorBoard) are closed by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
