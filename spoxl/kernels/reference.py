"""Pure-torch implementations of every spoxl.kernels op: the CPU backend and the oracle.

Plain autograd, no custom Functions. The diffusion math is spoxl.sampling's (DDIM mean/std,
transition_logprob), the scalar loss math is _heads' -- nothing is re-derived here. Inputs are
validated by the public functions in spoxl.kernels.ops before they reach this module.

Gradient contract (same as the Triton backend): policy inputs (mean_*, pred_*, feat_*) get
gradients; samples, targets and reference inputs are treated as constants (detached).
"""

from __future__ import annotations

import torch

from spoxl import sampling
from spoxl.kernels import _heads
from spoxl.kernels._checks import per_sample


def _maybe_metrics(loss_and_metrics, return_metrics: bool):
    """(loss, metrics) when asked for, else the loss (the head then computed no metrics at all)."""
    return loss_and_metrics if return_metrics else loss_and_metrics[0]


# ---------------------------------------------------------------------------------------------
# Sampling ops


def pool_noise(shape, device, seed) -> torch.Tensor:
    """Standard normal noise for the torch path: torch.Generator seeded by `seed` (or the global RNG)."""
    if seed is None:
        return torch.randn(shape, device=device, dtype=torch.float32)
    generator = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(shape, device=device, dtype=torch.float32, generator=generator)


@torch.no_grad()
def pool_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, k, *, noise=None, seed=None, return_logprob=False):
    """k DDIM(eta) candidates around one shared mean: samples = mean + std * z_j (epsilon prediction)."""
    batch = x_t.shape[0]
    a = per_sample("alpha_bar_t", alpha_bar_t, batch, x_t.device)
    a_prev = per_sample("alpha_bar_prev", alpha_bar_prev, batch, x_t.device)
    pred_x0, pred_eps = sampling.split_prediction(eps, x_t, a, "epsilon")
    std = sampling.ddim_std(a, a_prev, per_sample("eta", eta, batch, x_t.device))
    mean = sampling.ddim_mean(pred_x0, pred_eps, a_prev, std)
    if noise is None:
        noise = pool_noise((batch, k, *x_t.shape[1:]), x_t.device, seed)
    samples = (mean.unsqueeze(1) + sampling.bcast(std, noise) * noise.float()).to(x_t.dtype)
    if not return_logprob:
        return samples, mean, std
    logp = torch.stack([sampling.transition_logprob(samples[:, j], mean, std) for j in range(k)], 1)
    return samples, mean, std, logp


def transition_logprob(x_prev, mean, std):
    return sampling.transition_logprob(x_prev, mean, std)


def pool_logprobs(samples, mean, ref_mean, std):
    """(logp [B, k], ref_logp [B, k]) of every candidate under the policy and the reference mean."""
    k = samples.shape[1]
    logp = torch.stack([sampling.transition_logprob(samples[:, j], mean, std) for j in range(k)], 1)
    ref_logp = torch.stack([sampling.transition_logprob(samples[:, j], ref_mean, std) for j in range(k)], 1)
    return logp, ref_logp


# ---------------------------------------------------------------------------------------------
# Losses


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] mean over non-batch dims of (pred - target)^2 in fp32; the target is a constant."""
    return ((pred.float() - target.detach().float()) ** 2).flatten(1).mean(1)


def spo_loss(x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l, std, *, beta, clip, return_metrics=False):
    def log_ratio(x, mean, ref_mean):
        return sampling.transition_logprob(x, mean, std) - sampling.transition_logprob(x, ref_mean.detach(), std)

    head = _heads.spo_head(
        log_ratio(x_w, mean_w, ref_mean_w), log_ratio(x_l, mean_l, ref_mean_l), beta, clip, return_metrics
    )
    return _maybe_metrics(head, return_metrics)


def diffusion_dpo_loss(
    pred_w, pred_l, ref_pred_w, ref_pred_l, target_w, target_l, *, beta, return_metrics=False
):
    head = _heads.diffusion_dpo_head(
        per_sample_mse(pred_w, target_w),
        per_sample_mse(pred_l, target_l),
        per_sample_mse(ref_pred_w.detach(), target_w),
        per_sample_mse(ref_pred_l.detach(), target_l),
        beta,
        return_metrics,
    )
    return _maybe_metrics(head, return_metrics)


def mapo_loss(
    pred_w, pred_l, target_w, target_l, *, beta, snr, num_train_timesteps, return_metrics=False
):
    head = _heads.mapo_head(
        per_sample_mse(pred_w, target_w), per_sample_mse(pred_l, target_l), beta, snr, num_train_timesteps,
        return_metrics,
    )
    return _maybe_metrics(head, return_metrics)


def ncp_loss(
    feat_w,
    feat_l,
    ref_feat_w,
    ref_feat_l,
    target_feat_w,
    target_feat_l,
    *,
    beta,
    kind,
    return_metrics=False,
):
    ref_w = ref_l = None
    if kind == "dpo":
        ref_w = per_sample_mse(ref_feat_w.detach(), target_feat_w)
        ref_l = per_sample_mse(ref_feat_l.detach(), target_feat_l)
    head = _heads.ncp_head(
        per_sample_mse(feat_w, target_feat_w), per_sample_mse(feat_l, target_feat_l), ref_w, ref_l, beta, kind,
        return_metrics,
    )
    return _maybe_metrics(head, return_metrics)
