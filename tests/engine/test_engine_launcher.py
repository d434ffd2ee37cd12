"""Through the real deepspeed launcher, 2 CPU ranks (gloo): ZeRO-2/3 training with LoRA and full
fine-tuning, kill -9 + resume == uninterrupted, universal checkpoint 2 ranks -> 1 rank."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.launcher


def env(**extra):
    e = dict(os.environ)
    e.update(DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(REPO / ".venv" / "torch_extensions"),
             OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return e


def launch(args, num_ranks=2, timeout=300, **extra_env):
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", str(num_ranks), "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_zero_trains_lora_and_full_with_frozen_reference(stage, tmp_path):
    out = ok(launch([str(REPO / "tests/engine/launch_train_checks.py"), stage, str(tmp_path)]))
    assert f"CHECKS OK {stage} world=2" in out


def test_zero3_builds_the_unet_partitioned_and_loads_the_folder_into_the_partitions(tmp_path, tiny_dir):
    """No rank holds the whole UNet at load time under ZeRO-3 (issue 16): see launch_zero3_init_checks.py."""
    from safetensors.torch import save_file

    from spoxl.models.tiny import build_tiny_sdxl
    from tests.engine.ldm_keys import to_ldm

    other = build_tiny_sdxl(7).unet  # other weights than the folder's, as an A1111-layout single file
    state = {k: v.contiguous() for k, v in other.state_dict().items()}
    ldm_file = tmp_path / "unet_ldm.safetensors"
    save_file(to_ldm(state, dict(other.config)), str(ldm_file))
    save_file(state, str(ldm_file.with_suffix(".expected.safetensors")))
    out = ok(launch([str(REPO / "tests/engine/launch_zero3_init_checks.py"), str(tiny_dir), str(tmp_path),
                     str(ldm_file)]))
    assert "ZERO3 INIT OK world=2" in out


TRAIN = ["--config", "configs/tiny_sft.yaml", "--set", "deepspeed.config=ds_configs/zero3.json",
         "--set", "train.max_steps=6", "--set", "checkpoint.every=2", "--set", "checkpoint.keep_last=2",
         "--set", "train.grad_accum=1", "--set", "data.synthetic_size=8", "--set", "logging.sample_every=3",
         "--set", "logging.sample_steps=2", "--set", "ema.enabled=true", "--set", "logging.progress=false"]


def lora_of(run: Path, sub="") -> dict:
    return load_file(run / "export" / sub / "pytorch_lora_weights.safetensors")


def test_kill9_resume_equals_uninterrupted_and_universal_resume(tmp_path, tiny_dir):
    a, b = tmp_path / "a", tmp_path / "b"
    # Uninterrupted ZeRO-3 LoRA run, with EMA, sample grids (every rank samples) and export.
    ok(launch(["--module", "spoxl.train", *TRAIN, "--set", f"run.output_dir={a}"]))
    assert (a / "samples" / "step_00000003.png").is_file() and list((a / "tensorboard").glob("events.*"))
    assert "step 6/6" in (a / "train.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(a / "tensorboard")).Reload()
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "train/step_time_s",
                "train/mse", "memory/cpu_rss_mib"):
        assert len(events.Scalars(tag)) == 6, tag
    assert [e.step for e in events.Images("samples")] == [3, 6]
    assert sorted(p.name for p in (a / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    # DeepSpeed's own `latest` names the same tag, so the zero_to_fp32.py DeepSpeed copies into the
    # checkpoint folder recovers the trained (LoRA) weights without --tag.
    assert (a / "checkpoints" / "latest").read_text() == "step_00000006"
    fp32 = subprocess.run([sys.executable, str(a / "checkpoints" / "zero_to_fp32.py"), str(a / "checkpoints"),
                           str(tmp_path / "fp32"), "--safe_serialization"],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    ok(fp32)
    recovered = {}
    for f in (tmp_path / "fp32").glob("*.safetensors"):
        recovered.update(load_file(f))
    exported = lora_of(a)
    assert recovered and len(recovered) == len(exported), (sorted(recovered)[:4], sorted(exported)[:4])
    assert sorted(round(float(v.double().norm()), 4) for v in recovered.values()) == \
        sorted(round(float(v.double().norm()), 4) for v in exported.values())

    # Same run, SIGKILLed in the middle of saving step 4: `latest` must still name step 2.
    killed = launch([str(REPO / "tests/engine/train_killed_in_save.py"), "--kill-in-save", "4", *TRAIN,
                     "--set", f"run.output_dir={b}"])
    assert killed.returncode != 0
    assert (b / "checkpoints" / "latest_spoxl").read_text() == "step_00000002"
    assert (b / "checkpoints" / "latest").read_text() == "step_00000002"
    assert (b / "checkpoints" / "step_00000004").is_dir()  # the partial save is there, ignored
    # Resume through the `spoxl train` wrapper.
    cmd = [str(VENV_BIN / "spoxl"), "train", "--num-gpus", "2", "--master-port", str(free_port()), *TRAIN,
           "--set", f"run.output_dir={b}", "--resume"]
    ok(subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300))
    assert "at step 2" in (b / "train.log").read_text()
    for sub in ("", "ema"):
        wa, wb = lora_of(a, sub), lora_of(b, sub)
        assert wa.keys() == wb.keys() and wa
        for k in wa:
            assert wa[k].numel() > 0 and torch.equal(wa[k], wb[k]), (sub, k)

    # The exported LoRA loads into a diffusers SDXL pipeline built from the tiny folder.
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, local_files_only=True)
    pipe.load_lora_weights(str(a / "export"), weight_name="pytorch_lora_weights.safetensors")
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_B" in n}
    assert loaded and any(p.abs().max() > 0 for p in loaded.values())

    # Universal checkpoint: the 2-rank ZeRO-3 checkpoint resumes on 1 rank with the same weights.
    reference = {k: v.clone() for k, v in lora_of(a).items()}
    conv = subprocess.run([sys.executable, "-m", "spoxl.engine.checkpoint", "to-universal", str(a / "checkpoints")],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    ok(conv)
    ok(launch(["--module", "spoxl.train", *TRAIN, "--set", f"run.output_dir={a}",
               "--set", "checkpoint.load_universal=true", "--resume"], num_ranks=1))
    log = (a / "train.log").read_text()
    assert "step_00000006 at step 6" in log and "1 rank(s)" in log
    assert "saved on 2 rank(s), resuming on 1" in log and "data position" in log  # said, not silent
    for k, v in lora_of(a).items():
        assert torch.equal(v, reference[k]), k


def test_bf16_zero3_live_export_equals_spoxl_export_of_its_checkpoint(tmp_path):
    # bf16 keeps the module in bf16; the live export and the EMA must read DeepSpeed's fp32 master
    # weights, which is what the checkpoint holds and `spoxl export` merges.
    run = tmp_path / "run"
    ok(launch(["--module", "spoxl.train", "--config", "configs/tiny_sft.yaml",
               "--set", "deepspeed.config=ds_configs/zero3.json", "--set", "deepspeed.precision=bf16",
               "--set", "train.max_steps=3", "--set", "checkpoint.every=0", "--set", "ema.enabled=true",
               "--set", "logging.progress=false", "--set", "logging.sample_every=0",
               "--set", "data.synthetic_size=8", "--set", f"run.output_dir={run}"]))
    from spoxl.cli import main

    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "offline")]) == 0
    for sub in ("", "ema"):
        for name in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"):
            live, offline = load_file(run / "export" / sub / name), load_file(tmp_path / "offline" / sub / name)
            assert live.keys() == offline.keys() and live
            for k in live:
                assert torch.equal(live[k], offline[k]), (sub, name, k)
