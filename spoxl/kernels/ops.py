"""The public kernel API: validate once, then dispatch to the torch or the Triton backend.

Shapes: B batch, k pool size, latents [B, C, H, W] (any [B, ...] works); scalars may be floats or
[B] tensors. Inputs may be fp16, bf16, fp32 (or fp64); per-sample reductions accumulate in fp32.
Gradients flow into the policy inputs (mean_*, pred_*, feat_*); samples, targets and reference
inputs are constants. Every loss takes `return_metrics=True` to return (loss, metrics), metrics a
dict of detached 0-d tensors (implicit_acc, margin, ... and clamp_frac for SPO) computed from
the same per-sample values -- no second pass, no host sync.
"""

from __future__ import annotations

import torch

from spoxl.errors import SpoxlError
from spoxl.kernels import _checks
from spoxl.kernels._heads import NCP_KINDS
from spoxl.kernels.dispatch import backend_module


def _check_std(std, batch: int) -> None:
    """std: a float > 0, or one value per sample (tensor values are not inspected: that would sync)."""
    if isinstance(std, torch.Tensor):
        if std.numel() not in (1, batch):
            raise SpoxlError(
                f"std must be a float or hold one value per sample ({batch}), got shape {tuple(std.shape)}"
            )
    elif not float(std) > 0:
        raise SpoxlError(f"std must be > 0, got {std}")


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
    _check_std(std, mean.shape[0])
    return backend_module(mean.device).transition_logprob(x_prev, mean, std)


def pool_logprobs(samples, mean, ref_mean, std):
    """(logp [B, k], ref_logp [B, k]) of candidates `samples` [B, k, ...] under the policy mean and
    the reference mean [B, ...], in one pass; differentiable in mean and ref_mean."""
    _checks.same_shape({"mean": mean, "ref_mean": ref_mean})
    _checks.tensor("samples", samples, min_ndim=3)
    if samples.shape[0] != mean.shape[0] or samples.shape[2:] != mean.shape[1:]:
        raise SpoxlError(f"samples must have shape [B, k, *mean.shape[1:]], got {tuple(samples.shape)} "
                         f"for mean {tuple(mean.shape)}")  # fmt: skip
    _check_std(std, mean.shape[0])
    return backend_module(mean.device).pool_logprobs(samples, mean, ref_mean, std)


def spo_loss(x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l, std, *, beta, clip, return_metrics=False):
    """SPO: r = clamp(exp(logp - ref_logp), 1-clip, 1+clip) for w and l;
    loss = mean(-logsigmoid(beta log r_w - beta log r_l)). Gradients into mean_w and mean_l,
    zero where the clamp is active. Metrics: implicit_acc, margin, log_ratio_w/l, ratio_w/l, clamp_frac."""
    _checks.same_shape(
        {"x_w": x_w, "x_l": x_l, "mean_w": mean_w, "mean_l": mean_l, "ref_mean_w": ref_mean_w, "ref_mean_l": ref_mean_l}
    )
    _check_std(std, x_w.shape[0])
    if not 0 < clip < 1:
        raise SpoxlError(f"clip must be in (0, 1), got {clip}")
    return backend_module(x_w.device).spo_loss(
        x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l, std, beta=beta, clip=clip, return_metrics=return_metrics
    )


def diffusion_dpo_loss(
    pred_w, pred_l, ref_pred_w, ref_pred_l, target_w, target_l, *, beta, return_metrics=False
):
    """Diffusion-DPO: logit = -beta/2 ((mse_w - mse_l) - (ref_mse_w - ref_mse_l)), loss = mean(-logsigmoid).
    Gradients into pred_w and pred_l. Metrics: implicit_acc, margin, mse_w/l, ref_mse_w/l, model/ref_diff."""
    _checks.same_shape(
        {"pred_w": pred_w, "pred_l": pred_l, "ref_pred_w": ref_pred_w, "ref_pred_l": ref_pred_l,
         "target_w": target_w, "target_l": target_l}
    )  # fmt: skip
    return backend_module(pred_w.device).diffusion_dpo_loss(
        pred_w, pred_l, ref_pred_w, ref_pred_l, target_w, target_l, beta=beta, return_metrics=return_metrics
    )


def mapo_loss(
    pred_w, pred_l, target_w, target_l, *, beta, snr, num_train_timesteps, return_metrics=False
):
    """MaPO: mean(mse_w) - beta mean(logsigmoid(T (g(mse_w) - g(mse_l)))), g(m) = s m / (exp(s m) - 1).
    Gradients into pred_w and pred_l. Metrics: implicit_acc, margin (g_w - g_l), mse_w, mse_l."""
    _checks.same_shape({"pred_w": pred_w, "pred_l": pred_l, "target_w": target_w, "target_l": target_l})
    if not snr > 0:
        raise SpoxlError(f"snr must be > 0, got {snr}")
    return backend_module(pred_w.device).mapo_loss(
        pred_w, pred_l, target_w, target_l, beta=beta, snr=snr, num_train_timesteps=num_train_timesteps,
        return_metrics=return_metrics
    )


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
    """NCP in U-Net-feature space, d = mse_w - mse_l: kind 'dpo' -logsigmoid(beta (d_ref - d_theta)),
    'cpo' -logsigmoid(-beta d_theta), 'sft' mean(mse_w). ref_feat_* may be None unless kind='dpo'.
    Gradients into feat_w and feat_l. Metrics: implicit_acc, margin, mse_w/l, d_theta (and d_ref)."""
    if kind not in NCP_KINDS:
        raise SpoxlError(f"ncp kind must be one of {', '.join(NCP_KINDS)}, got {kind!r}")
    tensors = {"feat_w": feat_w, "feat_l": feat_l, "target_feat_w": target_feat_w, "target_feat_l": target_feat_l}
    if kind == "dpo":
        if ref_feat_w is None or ref_feat_l is None:
            raise SpoxlError("ncp kind 'dpo' needs ref_feat_w and ref_feat_l")
        tensors.update(ref_feat_w=ref_feat_w, ref_feat_l=ref_feat_l)
    _checks.same_shape(tensors)
    return backend_module(feat_w.device).ncp_loss(
        feat_w, feat_l, ref_feat_w, ref_feat_l, target_feat_w, target_feat_l, beta=beta, kind=kind,
        return_metrics=return_metrics,
    )  # fmt: skip
