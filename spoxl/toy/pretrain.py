"""`spoxl toy pretrain --out DIR`: make the toy-world model from nothing, on CPU.

  1. render the training scenes (spoxl.toy.data.render_set: jittered, 10% empty captions);
  2. train the toy VAE on them (a plain torch loop: L1 + MSE reconstruction with a small KL term;
     spoxl's engine trains UNets, and the VAE is a fixed part of every later run), and set its
     scaling_factor to 1 / std of its latents, as SDXL's VAE config does for SDXL's latents;
  3. save the untrained toy folder (trained VAE, random UNet, the tiny model's frozen text
     encoders) and train its UNet from scratch with spoxl's own engine: the SFT objective, full
     fine-tuning, DeepSpeed ZeRO-2 on CPU ranks through the deepspeed launcher
     (configs/toy_pretrain.yaml), latents and text embeddings cached once;
  4. assemble DIR: the folder with the EMA UNet of that run, plus pretrain.json (settings, seconds,
     CPU seconds).

The shipped spoxl/toy/weights/ came from `spoxl toy pretrain --out spoxl/toy/weights` with the
defaults below; pretrain.json beside the weights records what it took.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from spoxl.errors import SpoxlError
from spoxl.toy import data
from spoxl.toy.model import build_toy_base, toy_vae_config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = REPO_ROOT / "configs" / "toy_pretrain.yaml"
# Empty prompts stay EMPTY PROMPTS for CFG: the toy model was trained with "" as its unconditional
# caption, so it must not be told to use zero embeddings (SDXL base's force_zeros_for_empty_prompt).
MODEL_INDEX_FLAGS = {"force_zeros_for_empty_prompt": False}
WORK_MARKER = ".spoxl_toy_pretrain_work"


def train_vae(images_uint8: torch.Tensor, steps: int, batch_size: int = 32, lr: float = 2e-3,
              kl_weight: float = 1e-6, seed: int = 0, log=print):
    """A toy AutoencoderKL trained to reconstruct `images_uint8` ([N, 3, R, R]); returns it in eval
    mode with config.scaling_factor = 1 / std of the mean latents of the first 512 images."""
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**toy_vae_config())
    pixels = data.to_unit(images_uint8)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed)
    vae.train()
    bar = tqdm(range(steps), desc="toy VAE", unit="step", mininterval=10)
    for step in bar:
        x = pixels[torch.randint(0, len(pixels), (batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        rec = (recon - x).abs().mean() + (recon - x).pow(2).mean()
        loss = rec + kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            bar.set_postfix(reconstruction=f"{rec.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(pixels[:512]).latent_dist.mode()
        recon = vae.decode(latents).sample.clamp(-1, 1)
    l1 = float((recon - pixels[:512]).abs().mean())
    std = float(latents.std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    log(f"toy VAE: reconstruction L1 {l1:.4f} (pixels in [-1, 1]), latent std {std:.3f} -> scaling_factor {1 / std:.5f}")
    return vae, {"vae_reconstruction_l1": l1, "vae_latent_std": std}


def save_folder(parts, folder: Path) -> None:
    """A diffusers SDXL folder whose model_index.json carries MODEL_INDEX_FLAGS."""
    folder = Path(folder)
    parts.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(MODEL_INDEX_FLAGS)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def train_unet(base: Path, dataset: Path, work: Path, *, steps: int, ranks: int, recipe: Path,
               extra_overrides: list[str] = ()) -> Path:
    """Run the SFT recipe through `spoxl train` (the deepspeed launcher); returns the EMA UNet folder."""
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "spoxl.cli", "train", "--config", str(recipe), "--num-gpus", str(ranks),
           "--set", f"model.path={base}", "--set", f"data.path={dataset}",
           "--set", f"data.cache_dir={work / 'cache'}", "--set", f"run.output_dir={run_dir}",
           "--set", f"train.max_steps={steps}", *[a for o in extra_overrides for a in ("--set", o)]]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        raise SpoxlError(f"toy UNet pretraining failed (exit {result.returncode}); its log is in {run_dir}")
    unet = run_dir / "export" / "ema" / "unet"
    if not (unet / "config.json").is_file():
        raise SpoxlError(f"toy UNet pretraining wrote no EMA UNet export at {unet}")
    return unet


def pretrain(out: Path, *, images: int = 8192, vae_steps: int = 2500, unet_steps: int = 1500, ranks: int = 2,
             seed: int = 0, recipe: Path = DEFAULT_RECIPE, work: Path | None = None,
             extra_overrides: list[str] = ()) -> dict:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpoxlError(f"--out {out} is a file, not a folder")
    # Only an empty folder or an earlier `spoxl toy pretrain` result (it holds pretrain.json) is
    # replaced: never a user's own model folder.
    if out.exists() and any(out.iterdir()) and not (out / "pretrain.json").is_file():
        raise SpoxlError(f"{out} is not empty and is not a folder made by `spoxl toy pretrain`; refusing to overwrite it")
    work = Path(work) if work else out.with_name(out.name + ".work")
    if work.exists():
        if not (work / WORK_MARKER).is_file():
            raise SpoxlError(f"{work} exists and was not made by `spoxl toy pretrain`; move it away first")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / WORK_MARKER).write_text("scratch folder of spoxl toy pretrain; deleted when it finishes\n")
    t0 = time.time()
    cpu0 = _cpu_seconds()
    print(f"rendering {images} training scenes", flush=True)
    pixels, captions = data.render_set(images, seed)
    t_vae = time.time()
    vae, vae_stats = train_vae(pixels, vae_steps, seed=seed)
    vae_seconds = time.time() - t_vae
    base = work / "base"
    save_folder(build_toy_base(seed, vae), base)
    dataset = data.write_caption_folder(work / "data", pixels, captions)
    unet = train_unet(base, dataset, work, steps=unet_steps, ranks=ranks, recipe=recipe,
                      extra_overrides=extra_overrides)
    staged = work / "final"
    shutil.copytree(base, staged)
    shutil.rmtree(staged / "unet")
    shutil.copytree(unet, staged / "unet")
    info = {
        "images": images, "vae_steps": vae_steps, "unet_steps": unet_steps, "ranks": ranks, "seed": seed,
        "recipe": str(recipe.relative_to(REPO_ROOT) if recipe.is_relative_to(REPO_ROOT) else recipe),
        "overrides": list(extra_overrides),
        "seconds_vae": round(vae_seconds, 1), "seconds_total": round(time.time() - t0, 1),
        "cpu_seconds_total": round(_cpu_seconds() - cpu0, 1), "cpu_cores": os.cpu_count(), **vae_stats,
    }
    (staged / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staged), str(out))  # the finished folder appears in one step
    shutil.rmtree(work, ignore_errors=True)
    print(f"toy model written to {out} in {info['seconds_total']:.0f} s ({info['cpu_seconds_total']:.0f} CPU s)")
    return info


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the launcher's ranks)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
