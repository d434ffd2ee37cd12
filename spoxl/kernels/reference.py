"""Pure-torch implementations of the sampling ops: their CPU backend and the tests' oracle
(each loss's torch reference lives in its own module, spoxl/kernels/losses/).

Plain autograd, no custom Functions. The diffusion math is spoxl.sampling's (DDIM mean/std,
transition_logprob) -- nothing is re-derived here. Inputs are validated by the public functions
in spoxl.kernels.ops before they reach this module.

Gradient contract (same as the Triton backend): the means get gradients; samples are constants.
"""

from __future__ import annotations

import torch

from spoxl import sampling
from spoxl.kernels._checks import per_sample


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
