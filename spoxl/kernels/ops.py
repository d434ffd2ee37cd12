"""The public sampling ops: validate once, then dispatch to the torch or the Triton backend.
(The loss ops live one module each in spoxl.kernels.losses, with the same conventions.)

Shapes: B batch, k pool size, latents [B, C, H, W] (any [B, ...] works); scalars may be floats or
[B] tensors. Inputs may be fp16, bf16, fp32 (or fp64); per-sample reductions accumulate in fp32.
Gradients flow into the policy inputs (mean_*, pred_*, feat_*); samples, targets and reference
inputs are constants. Every loss takes `return_metrics=True` to return (loss, metrics), metrics a
dict of detached 0-d tensors (implicit_acc, margin, ... and clamp_frac for SPO) computed from
the same per-sample values -- no second pass, no host sync.
"""

from __future__ import annotations

from spoxl.errors import SpoxlError
from spoxl.kernels import _checks
from spoxl.kernels.dispatch import backend_module


def pool_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, k, *, noise=None, seed=None, return_logprob=False):
    """One DDIM(eta) step (epsilon prediction) from each x_t to k candidates around the shared mean.

    Returns (samples [B, k, C, H, W] in x_t's dtype, mean [B, C, H, W] fp32, std [B] fp32), and
    with return_logprob=True also logp [B, k]: each stored candidate's transition_logprob under
    the mean, from the same kernel (the Triton path adds one small head launch, not a pass).
    alpha_bar_t, alpha_bar_prev and eta may be numbers or 1-element CPU tensors (one timestep for
    the batch: passed to the kernel as arguments, no host-to-device copy) or [B] tensors.
    `noise` [B, k, C, H, W] makes the step exact; otherwise noise is drawn from `seed`
    (torch backend: a torch.Generator; Triton: Philox), reproducibly, or from the global RNG
    when seed is None. The two backends draw different streams for the same seed. No gradients.
    """
    _checks.same_shape({"x_t": x_t, "eps": eps})
    k = _checks.pool_size(k)
    if noise is not None:
        _checks.tensor("noise", noise)
        expected = (x_t.shape[0], k, *x_t.shape[1:])
        if tuple(noise.shape) != expected:
            raise SpoxlError(f"noise must have shape {expected} ([B, k, ...]), got {tuple(noise.shape)}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise SpoxlError(f"seed must be a non-negative int, got {seed!r}")
    return backend_module(x_t.device).pool_step(
        x_t, eps, alpha_bar_t, alpha_bar_prev, eta, k, noise=noise, seed=seed, return_logprob=return_logprob
    )


def transition_logprob(x_prev, mean, std):
    """[B] Gaussian log density of x_prev under N(mean, std^2), averaged over latent elements
    (including -log(std) - log(sqrt(2 pi))); differentiable in `mean`."""
    _checks.same_shape({"mean": mean, "x_prev": x_prev})
    _checks.std(std, mean.shape[0])
    return backend_module(mean.device).transition_logprob(x_prev, mean, std)


def pool_logprobs(samples, mean, ref_mean, std):
    """(logp [B, k], ref_logp [B, k]) of candidates `samples` [B, k, ...] under the policy mean and
    the reference mean [B, ...], in one pass; differentiable in mean and ref_mean."""
    _checks.same_shape({"mean": mean, "ref_mean": ref_mean})
    _checks.tensor("samples", samples, min_ndim=3)
    if samples.shape[0] != mean.shape[0] or samples.shape[2:] != mean.shape[1:]:
        raise SpoxlError(f"samples must have shape [B, k, *mean.shape[1:]], got {tuple(samples.shape)} "
                         f"for mean {tuple(mean.shape)}")  # fmt: skip
    _checks.std(std, mean.shape[0])
    return backend_module(mean.device).pool_logprobs(samples, mean, ref_mean, std)
