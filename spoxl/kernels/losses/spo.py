"""SPO's clipped log-ratio DPO loss (methods.md 1.2): reference, head, and the fused Triton path.

r = clamp(exp(log pi_theta - log pi_ref), 1 - clip, 1 + clip) for winner and loser;
loss = mean(-logsigmoid(beta log r_w - beta log r_l)). The log-ratio of a DDIM transition is
per-sample Gaussian algebra over the latents, reduced by the shared log-ratio kernel; torch.clamp
passes no gradient where the clamp is active, exactly as the official code.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from spoxl import sampling
from spoxl.errors import SpoxlError
from spoxl.kernels import _checks
from spoxl.kernels.losses import _common as C

# The metrics, in the order the Triton head writes them (batch means, as `head` defines them).
METRICS = ("implicit_acc", "margin", "log_ratio_w", "log_ratio_l", "ratio_w", "ratio_l", "clamp_frac")
REDUCTION = "logratio"  # the shared reduction kernel this loss reads: sums of (x-ref)^2 - (x-mean)^2


def spo_loss(x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l, std, *, beta, clip, return_metrics=False):
    """SPO: r = clamp(exp(logp - ref_logp), 1-clip, 1+clip) for w and l;
    loss = mean(-logsigmoid(beta log r_w - beta log r_l)). Gradients into mean_w and mean_l,
    zero where the clamp is active. Metrics: implicit_acc, margin, log_ratio_w/l, ratio_w/l, clamp_frac."""
    _checks.same_shape(
        {"x_w": x_w, "x_l": x_l, "mean_w": mean_w, "mean_l": mean_l, "ref_mean_w": ref_mean_w, "ref_mean_l": ref_mean_l}
    )
    _checks.std(std, x_w.shape[0])
    if not 0 < clip < 1:
        raise SpoxlError(f"clip must be in (0, 1), got {clip}")
    impl = fused if C.uses_triton(x_w.device) else reference
    return impl(x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l, std, beta=beta, clip=clip, return_metrics=return_metrics)


def head(log_ratio_w: torch.Tensor, log_ratio_l: torch.Tensor, beta: float, clip: float, with_metrics=True):
    """(loss, metrics) from per-sample log pi_theta - log pi_ref of winner and loser, in fp64."""
    dtype = log_ratio_w.dtype
    log_ratio_w, log_ratio_l = C.fp64(log_ratio_w, log_ratio_l)
    ratio_w = torch.clamp(torch.exp(log_ratio_w), 1 - clip, 1 + clip)
    ratio_l = torch.clamp(torch.exp(log_ratio_l), 1 - clip, 1 + clip)
    logit = beta * (torch.log(ratio_w) - torch.log(ratio_l))
    loss = -F.logsigmoid(logit).mean()

    def metrics():
        # The clamp is active where exp(log_ratio) lies outside [1 - clip, 1 + clip] (ratio space, as clamp).
        raw = torch.exp(torch.cat([log_ratio_w, log_ratio_l]))
        return {
            "implicit_acc": C.implicit_accuracy(logit),
            "margin": logit.mean(),
            "log_ratio_w": log_ratio_w.mean(),
            "log_ratio_l": log_ratio_l.mean(),
            "ratio_w": ratio_w.mean(),
            "ratio_l": ratio_l.mean(),
            "clamp_frac": ((raw < 1 - clip) | (raw > 1 + clip)).float().mean(),
        }

    return C.finish(loss, with_metrics and metrics, dtype)


def reference(x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l, std, *, beta, clip, return_metrics=False):
    """Plain torch autograd: transition log-probs from spoxl.sampling, then `head`."""

    def log_ratio(x, mean, ref_mean):
        return sampling.transition_logprob(x, mean, std) - sampling.transition_logprob(x, ref_mean.detach(), std)

    out = head(log_ratio(x_w, mean_w, ref_mean_w), log_ratio(x_l, mean_l, ref_mean_l), beta, clip, return_metrics)
    return C.maybe_metrics(out, return_metrics)


def fused(x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l, std, *, beta, clip, return_metrics=False):
    """Triton: the shared log-ratio reduction, `triton_heads()` in the shared head kernel, one
    elementwise backward (3 launches fwd+bwd, metrics included)."""
    T = C.triton_ops()
    params = (float(beta), float(clip), 0.0)
    loss, metrics = T.FusedSpoLoss.apply(triton_heads()["spo"], params, x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l,
                                         T.per_sample_std(std, mean_w))  # fmt: skip
    return T.with_metrics(METRICS, loss, metrics, return_metrics)


# Bound by triton_heads() on first use (_common.bind_triton; helpers too: module globals, not closures).
tl = K = None


@functools.cache
def triton_heads() -> dict:
    """{variant: `head` as a Triton device function for the shared loss head kernel}, built on first use."""
    C.bind_triton(globals())
    import triton

    @triton.jit
    def spo_head(s0, s1, s2, s3, std, beta, clip, p2, inv_b, inv_n, rmask, met_ptr):
        # s0, s1: sums of (x - ref)^2 - (x - mean)^2 for w and l (s2, s3, p2 unused)
        two_scale = inv_n / (std * std)  # d log-ratio / d mean = (x - mean) * two_scale
        lr_w = 0.5 * s0 * two_scale
        lr_l = 0.5 * s1 * two_scale
        lo = 1.0 - clip
        hi = 1.0 + clip
        r_w = tl.exp(lr_w)
        r_l = tl.exp(lr_l)
        in_w = (r_w >= lo) & (r_w <= hi)  # inclusive bounds, as torch.clamp
        in_l = (r_l >= lo) & (r_l <= hi)
        log_r_w = tl.log(tl.minimum(tl.maximum(r_w, lo), hi))
        log_r_l = tl.log(tl.minimum(tl.maximum(r_l, lo), hi))
        logit = beta * (log_r_w - log_r_l)
        per_sample = -K.log_sigmoid(logit)
        d_logit = -K.sigmoid_neg(logit) * inv_b
        # grad mean = dL/dlr * (x - mean) * two_scale = coef * (mean - x), coef = -dL/dlr * two_scale;
        # zero where the clamp is active
        coef_w = -tl.where(in_w, d_logit * beta, 0.0) * two_scale
        coef_l = tl.where(in_l, d_logit * beta, 0.0) * two_scale
        tl.store(met_ptr + 0, K.implicit_acc(logit, rmask, inv_b).to(tl.float32))
        tl.store(met_ptr + 1, K.mean_b(logit, rmask, inv_b).to(tl.float32))
        tl.store(met_ptr + 2, K.mean_b(lr_w, rmask, inv_b).to(tl.float32))
        tl.store(met_ptr + 3, K.mean_b(lr_l, rmask, inv_b).to(tl.float32))
        tl.store(met_ptr + 4, K.mean_b(tl.exp(log_r_w), rmask, inv_b).to(tl.float32))
        tl.store(met_ptr + 5, K.mean_b(tl.exp(log_r_l), rmask, inv_b).to(tl.float32))
        clamped = tl.where(in_w, 0.0, 1.0) + tl.where(in_l, 0.0, 1.0)
        tl.store(met_ptr + 6, (0.5 * K.mean_b(clamped, rmask, inv_b)).to(tl.float32))
        return per_sample, coef_w, coef_l

    return {"spo": spo_head}
