"""SPO through the real deepspeed launcher, 2 CPU ranks (gloo), on the demo setting
(configs/tiny_spo.yaml): ZeRO-2 trains and the preference score of final samples on held-out seeds
rises; ZeRO-3 runs the same training (same per-step losses, same exported LoRA, hence the same
rise)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
pytestmark = pytest.mark.launcher


def launch(out: Path, stage: str, steps: int) -> subprocess.Popen:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".venv" / "torch_extensions"))  # fmt: skip
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "spoxl.train", "--config", "configs/tiny_spo.yaml",
           "--set", f"run.output_dir={out}", "--set", f"deepspeed.config=ds_configs/{stage}.json",
           "--set", f"train.max_steps={steps}", "--set", "logging.sample_every=0"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, out: Path) -> str:
    try:
        output, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-6000:]
    return (out / "train.log").read_text()


def losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+ loss ([0-9.]+)", log)]


def test_spo_zero2_improves_preference_and_zero3_trains_the_same(tmp_path):
    from spoxl.demo_report import build_report

    z2, z3 = tmp_path / "zero2", tmp_path / "zero3"
    # Both launches at once: most of a launch is start-up (imports, process group), which overlaps.
    p2, p3 = launch(z2, "zero2", 40), launch(z3, "zero3", 40)
    log2, log3 = finish(p2, z2), finish(p3, z3)
    assert "step 40/40" in log2
    assert list((z2 / "tensorboard").glob("events.*")) and (z2 / "checkpoints" / "step_00000040").is_dir()
    report = build_report(z2, seeds=8)
    # Fixed seeds: the held-out final images score higher after SPO, by a real margin
    # (measured: +1.5 +- 0.4 at 40 steps, 78% of seeds better).
    assert report["diff_mean"] > 0.5 and report["diff_mean"] > 2 * report["diff_stderr"], report
    assert report["win_rate"] >= 0.6, report
    assert (z2 / "report.md").is_file() and "tuned > base" in (z2 / "report.md").read_text()

    # ZeRO-3 partitions the UNet but computes the same thing: same rounds, same pairs, same losses,
    # the same trained LoRA (up to float reduction order through 40 Adam steps), the same rise.
    l2, l3 = losses(log2), losses(log3)
    assert len(l3) == 40 and l3 == pytest.approx(l2, abs=2e-4)
    lora2 = load_file(z2 / "export" / "pytorch_lora_weights.safetensors")
    lora3 = load_file(z3 / "export" / "pytorch_lora_weights.safetensors")
    assert lora3.keys() == lora2.keys() and all(t.numel() > 0 for t in lora3.values())
    for key in lora2:  # elementwise, Adam's normalisation amplifies 1e-7 gradient noise on tiny entries
        assert (lora3[key] - lora2[key]).norm() <= 2e-3 * lora2[key].norm() + 1e-6, key
    report3 = build_report(z3, seeds=8)
    assert report3["diff_mean"] > 0.5 and report3["diff_mean"] > 2 * report3["diff_stderr"], report3


def test_the_sd15_recipe_runs_on_an_sd15_folder_through_the_launcher(tmp_path):
    """configs/spo_sd15.yaml as published (bf16, ZeRO-2, k = 4 per-step branching, LoRA rank 4) on a
    diffusers SD1.5 folder, 2 CPU ranks; only the model, the prompts and the preference model
    (a programmatic scorer in place of the SD1.5 SPM file) are swapped for tiny ones."""
    from spoxl.config import load_config
    from spoxl.models.tiny import build_tiny_sd15

    model = tmp_path / "sd15"
    build_tiny_sd15(0).save_pretrained(model)
    out = tmp_path / "run"
    recipe = load_config(REPO / "configs" / "spo_sd15.yaml", [])
    assert (recipe.method.params.pool_size, recipe.method.params.num_inner_step, recipe.lora.rank) == (4, 0, 4)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".venv" / "torch_extensions"))  # fmt: skip
    cmd = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "spoxl.train", "--config", "configs/spo_sd15.yaml",
           "--set", f"run.output_dir={out}", "--set", f"model.path={model}", "--set", "method.resolution=null",
           "--set", 'method.prompts=["a red circle","a green square","a blue cat","a yellow dog"]',
           "--set", "method.prompts_per_rank=2", "--set", "method.steps=10", "--set", "method.epochs=null",
           "--set", "method.preference.kind=colour", "--set", "method.preference.scale=3000",
           "--set", "method.preference.path=null", "--set", "method.preference.weights=null",
           "--set", "train.micro_batch_size=4", "--set", "train.max_steps=3", "--set", "logging.sample_every=0",
           "--set", "logging.every=1", "--set", "checkpoint.every=0"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = finish(proc, out)
    assert "step 3/3" in log and "(bf16)" in log
    assert len(losses(log)) == 3 and all(math.isfinite(x) for x in losses(log))
    from safetensors import safe_open

    with safe_open(str(out / "export" / "pytorch_lora_weights_kohya.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_base_model_version"] == "sd_v1" and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_") for k in keys)
    assert max(int(v.shape[0]) for k, v in load_file(out / "export" / "pytorch_lora_weights.safetensors").items()
               if "lora_A" in k) == 4  # the recipe's rank  # fmt: skip
