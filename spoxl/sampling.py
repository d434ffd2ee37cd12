"""Diffusion math in one place: noising, DDIM(eta) steps, the DDPM posterior, transition
log-probabilities (SPO/DDPO convention), classifier-free guidance, and the plain DDIM sampler.

Schedules are never re-derived here: alphas_cumprod and the inference timesteps come from the
diffusers scheduler (`components.scheduler`), so a real SDXL scheduler config is honoured.

Notation: a = alpha_bar_t (at the source timestep t), a_prev = alpha_bar at the next (smaller)
timestep of the inference grid. Scalars may be floats or per-sample [B] tensors.

Conventions (DESIGN.md): the log-probability of a transition is the MEAN over latent elements of
the Gaussian log density, including -log(std) - log(sqrt(2*pi)).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def bcast(v, like: torch.Tensor) -> torch.Tensor:
    """A float or [B] tensor as a [B, 1, 1, ...] tensor broadcastable against `like` (fp32)."""
    v = torch.as_tensor(v, dtype=torch.float32, device=like.device)
    if v.ndim == 0:
        return v
    return v.reshape(-1, *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------------
# Schedule access (from the diffusers scheduler, never by hand)


def alphas_cumprod(scheduler) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(torch.float32)


def inference_timesteps(scheduler, num_steps: int) -> torch.Tensor:
    """The descending DDIM timesteps (SDXL, 20 steps: 951, 901, ..., 1)."""
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.clone()


def prev_timestep(scheduler, t, num_steps: int):
    """The next (smaller) timestep on the inference grid, as diffusers' DDIMScheduler computes it."""
    return t - scheduler.config.num_train_timesteps // num_steps


def alpha_bar(scheduler, t) -> torch.Tensor:
    """alpha_bar at timestep(s) t; t < 0 maps to final_alpha_cumprod like DDIMScheduler.step."""
    ac = alphas_cumprod(scheduler)
    t = torch.as_tensor(t, dtype=torch.long)
    final = torch.as_tensor(float(scheduler.final_alpha_cumprod), dtype=torch.float32)
    return torch.where(t >= 0, ac[t.clamp(min=0)], final)


# ---------------------------------------------------------------------------------------------
# Noising and model-output conversions


def add_noise(x0: torch.Tensor, noise: torch.Tensor, a) -> torch.Tensor:
    """x_t = sqrt(a) x0 + sqrt(1 - a) noise."""
    a = bcast(a, x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def split_prediction(output: torch.Tensor, x_t: torch.Tensor, a, prediction_type: str = "epsilon"):
    """(pred_x0, pred_eps) from the model output, in fp32, for epsilon / v_prediction / sample."""
    a = bcast(a, x_t)
    out, x = output.float(), x_t.float()
    if prediction_type == "epsilon":
        eps = out
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    elif prediction_type == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
        eps = a.sqrt() * out + (1 - a).sqrt() * x
    elif prediction_type == "sample":
        x0 = out
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0, eps


def training_target(x0: torch.Tensor, noise: torch.Tensor, a, prediction_type: str = "epsilon"):
    """What the UNet is trained to output: the noise, or v = sqrt(a) noise - sqrt(1-a) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = bcast(a, x0)
        return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(noise.dtype)
    raise ValueError(f"cannot train prediction_type {prediction_type!r}")


def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + scale * (eps_c - eps_u)."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


# ---------------------------------------------------------------------------------------------
# DDIM / DDPM steps


def ddim_std(a, a_prev, eta):
    """sigma_t = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)); eta=1 is the DDPM posterior std."""
    a = torch.as_tensor(a, dtype=torch.float32)
    a_prev = torch.as_tensor(a_prev, dtype=torch.float32)
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    return eta * variance.clamp(min=0).sqrt()


def ddim_mean(pred_x0: torch.Tensor, pred_eps: torch.Tensor, a_prev, std) -> torch.Tensor:
    """mu = sqrt(a_prev) x0 + sqrt(1 - a_prev - std^2) eps (fp32)."""
    a_prev = bcast(a_prev, pred_x0)
    std = bcast(std, pred_x0)
    return a_prev.sqrt() * pred_x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * pred_eps


def ddim_step(
    output: torch.Tensor,
    x_t: torch.Tensor,
    a,
    a_prev,
    eta: float,
    noise: torch.Tensor | None = None,
    prediction_type: str = "epsilon",
):
    """One DDIM(eta) step. Returns (x_prev, mean, std, pred_x0); x_prev in x_t's dtype.

    Matches diffusers DDIMScheduler.step (clip_sample=False, no thresholding) given the same noise.
    """
    pred_x0, pred_eps = split_prediction(output, x_t, a, prediction_type)
    std = ddim_std(a, a_prev, eta).to(x_t.device)
    mean = ddim_mean(pred_x0, pred_eps, a_prev, std)
    if noise is None or float(torch.as_tensor(eta)) == 0.0:
        x_prev = mean
    else:
        x_prev = mean + bcast(std, mean) * noise.float()
    return x_prev.to(x_t.dtype), mean, std, pred_x0


def ddpm_posterior(x_t: torch.Tensor, pred_x0: torch.Tensor, a, a_prev):
    """The DDPM posterior q(x_prev | x_t, x0): (mean, variance) with fixed_small variance.

    beta = 1 - a / a_prev; mean = sqrt(a_prev) beta / (1 - a) x0 + sqrt(a / a_prev)(1 - a_prev)/(1 - a) x_t.
    The variance is DDIM's at eta = 1 (the same quantity; NCP steps with this posterior).
    """
    a_b, ap_b = bcast(a, x_t), bcast(a_prev, x_t)
    beta = 1 - a_b / ap_b
    mean = (ap_b.sqrt() * beta / (1 - a_b)) * pred_x0.float() + (
        (a_b / ap_b).sqrt() * (1 - ap_b) / (1 - a_b)
    ) * x_t.float()
    return mean, ddim_std(a, a_prev, eta=1.0) ** 2


def transition_logprob(x_prev: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """[B] mean over latent elements of log N(x_prev; mean, std^2); gradient flows into `mean` only.

    The plain-torch definition; `spoxl.kernels.transition_logprob` is the fused equivalent.
    """
    std_b = bcast(std, mean)
    x = x_prev.detach().float()
    logp = -((x - mean.float()) ** 2) / (2 * std_b**2) - torch.log(std_b) - LOG_SQRT_2PI
    return logp.flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------
# The denoiser: one UNet call for conditional and unconditional halves


def unet_eps(
    unet,
    x_t: torch.Tensor,
    t,
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    time_ids: torch.Tensor,
) -> torch.Tensor:
    """The UNet's raw output for a batch (t may be an int or a [B] tensor)."""
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(x_t.shape[0])
    return unet(
        x_t,
        t,
        encoder_hidden_states=embeds,
        added_cond_kwargs=added_conditioning(pooled, time_ids),
        return_dict=False,
    )[0]


def added_conditioning(pooled: torch.Tensor, time_ids: torch.Tensor) -> dict | None:
    """SDXL's text_time conditioning; None for SD1.5, whose prompt encoding leaves pooled empty
    (spoxl.models.text): its UNet takes no added conditioning."""
    if pooled.shape[-1] == 0:
        return None
    return {"text_embeds": pooled, "time_ids": time_ids}


def guided_output(unet, x_t, t, cond, uncond, time_ids, cfg_scale: float) -> torch.Tensor:
    """CFG-combined UNet output with the cond and uncond halves in ONE batched UNet call."""
    if cfg_scale == 1.0:
        return unet_eps(unet, x_t, t, cond.embeds, cond.pooled, time_ids)
    t = torch.as_tensor(t, device=x_t.device)
    if t.ndim == 0:
        t = t.expand(x_t.shape[0])
    out = unet_eps(
        unet,
        torch.cat([x_t, x_t]),
        torch.cat([t, t]),
        torch.cat([uncond.embeds, cond.embeds]),
        torch.cat([uncond.pooled, cond.pooled]),
        torch.cat([time_ids, time_ids]),
    )
    out_u, out_c = out.chunk(2)
    return cfg_combine(out_u.float(), out_c.float(), cfg_scale)


@torch.no_grad()
def ddim_sample(
    components,
    cond,
    uncond,
    time_ids: torch.Tensor,
    *,
    steps: int = 20,
    cfg_scale: float = 5.0,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    progress: Callable | None = None,
) -> torch.Tensor:
    """Plain batched DDIM(eta) sampling; returns final latents [B, 4, h, w] (unscaled by the VAE)."""
    unet, sched = components.unet, components.scheduler
    device, dtype = x_device_dtype(unet)
    if latents is None:
        side = unet.config.sample_size
        latents = torch.randn(
            (len(cond), unet.config.in_channels, side, side), generator=generator, dtype=torch.float32
        )
    x = latents.to(device=device, dtype=dtype)
    timesteps = inference_timesteps(sched, steps)
    ptype = sched.config.prediction_type
    iterator = progress(timesteps) if progress else timesteps
    for t in iterator:
        t = int(t)
        a, a_prev = alpha_bar(sched, t), alpha_bar(sched, prev_timestep(sched, t, steps))
        out = guided_output(unet, x, t, cond, uncond, time_ids, cfg_scale)
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device)
        x, *_ = ddim_step(out, x, a.to(device), a_prev.to(device), eta, noise, ptype)
    return x


def x_device_dtype(module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


# The most latents the VAE decodes in one call. The decoder works at full pixel resolution, so its
# activations outgrow the caches long before the UNet's do: on the 2-core CPU a 64 px decode costs
# 4.4 ms per image in fp32 in calls of 16 and 9.2 ms in calls of 64 (bf16: 2.9 and 4.5 ms).
DECODE_CHUNK = 16
# ... and the most pixels: a call's activations grow with its pixels (at SDXL's 1024 px about
# 3 GiB per image in fp32), so a call holds at most 4 SDXL-size images (12 GiB in fp32, 6 in
# bf16) whatever the pool: a pool of 16 at 1024 px would otherwise need 48 GiB in one call. At
# 1024 px a single image already fills an accelerator, so smaller calls cost no throughput there.
# Preflight counts one call (spoxl.cluster.activations).
DECODE_PIXELS = 4 * 1024 * 1024


def vae_scale_factor(vae) -> int:
    """Pixels per latent along a side: 8 for SDXL's VAE (one upsampling per block after the first)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def decode_chunk(height: int, width: int) -> int:
    """Latents per VAE call for images of height x width pixels: DECODE_CHUNK, fewer where a call
    would pass DECODE_PIXELS, and at least one."""
    return max(1, min(DECODE_CHUNK, DECODE_PIXELS // (height * width)))


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Latents -> images in [-1, 1] (fp32), undoing the VAE scaling factor; `chunk` latents per
    VAE call (default: decode_chunk of the images' size)."""
    if chunk is None:
        factor = vae_scale_factor(vae)
        chunk = decode_chunk(latents.shape[-2] * factor, latents.shape[-1] * factor)
    dtype = next(vae.parameters()).dtype
    scaled = latents.to(dtype) / vae.config.scaling_factor
    images = [vae.decode(part, return_dict=False)[0].float() for part in scaled.split(chunk)]
    return torch.cat(images).clamp(-1, 1)
