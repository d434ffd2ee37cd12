"""Diffusion-DPO (methods.md 2): reference, head, and the fused Triton path.

logit = -beta/2 ((mse_w - mse_l) - (ref_mse_w - ref_mse_l)); loss = mean(-logsigmoid(logit)),
the MSEs per sample over the latents (the shared squared-error kernel reduces all four at once).
"""

from __future__ import annotations

import functools

import torch.nn.functional as F

from spoxl.kernels import _checks
from spoxl.kernels.losses import _common as C

METRICS = ("implicit_acc", "margin", "mse_w", "mse_l", "ref_mse_w", "ref_mse_l", "model_diff", "ref_diff")
REDUCTION = "sqerr"  # the shared reduction kernel: sums of squared errors of pred_w, pred_l, ref_w, ref_l


def diffusion_dpo_loss(pred_w, pred_l, ref_pred_w, ref_pred_l, target_w, target_l, *, beta, return_metrics=False):
    """Diffusion-DPO: logit = -beta/2 ((mse_w - mse_l) - (ref_mse_w - ref_mse_l)), loss = mean(-logsigmoid).
    Gradients into pred_w and pred_l. Metrics: implicit_acc, margin, mse_w/l, ref_mse_w/l, model/ref_diff."""
    _checks.same_shape(
        {"pred_w": pred_w, "pred_l": pred_l, "ref_pred_w": ref_pred_w, "ref_pred_l": ref_pred_l,
         "target_w": target_w, "target_l": target_l}
    )  # fmt: skip
    impl = fused if C.uses_triton(pred_w.device) else reference
    return impl(pred_w, pred_l, ref_pred_w, ref_pred_l, target_w, target_l, beta=beta, return_metrics=return_metrics)


def head(mse_w, mse_l, ref_mse_w, ref_mse_l, beta: float, with_metrics=True):
    """(loss, metrics) from the four per-sample MSEs, in fp64."""
    dtype = mse_w.dtype
    mse_w, mse_l, ref_mse_w, ref_mse_l = C.fp64(mse_w, mse_l, ref_mse_w, ref_mse_l)
    model_diff = mse_w - mse_l
    ref_diff = ref_mse_w - ref_mse_l
    logit = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(logit).mean()

    def metrics():
        return {
            "implicit_acc": C.implicit_accuracy(logit),
            "margin": logit.mean(),
            "mse_w": mse_w.mean(),
            "mse_l": mse_l.mean(),
            "ref_mse_w": ref_mse_w.mean(),
            "ref_mse_l": ref_mse_l.mean(),
            "model_diff": model_diff.mean(),
            "ref_diff": ref_diff.mean(),
        }

    return C.finish(loss, with_metrics and metrics, dtype)


def reference(pred_w, pred_l, ref_pred_w, ref_pred_l, target_w, target_l, *, beta, return_metrics=False):
    """Plain torch autograd: per-sample MSEs, then `head`."""
    out = head(
        C.per_sample_mse(pred_w, target_w),
        C.per_sample_mse(pred_l, target_l),
        C.per_sample_mse(ref_pred_w.detach(), target_w),
        C.per_sample_mse(ref_pred_l.detach(), target_l),
        beta,
        return_metrics,
    )
    return C.maybe_metrics(out, return_metrics)


def fused(pred_w, pred_l, ref_pred_w, ref_pred_l, target_w, target_l, *, beta, return_metrics=False):
    """Triton: the shared squared-error reduction, `triton_heads()`, one elementwise backward."""
    T = C.triton_ops()
    loss, metrics = T.FusedPairLoss.apply(
        triton_heads()["diffusion_dpo"], (float(beta), 0.0, 0.0), pred_w, pred_l, target_w, target_l, ref_pred_w, ref_pred_l
    )
    return T.with_metrics(METRICS, loss, metrics, return_metrics)


# Bound by triton_heads() on first use (_common.bind_triton; helpers too: module globals, not closures).
tl = K = None


@functools.cache
def triton_heads() -> dict:
    """{variant: `head` as a Triton device function for the shared loss head kernel}, built on first use."""
    C.bind_triton(globals())
    import triton

    @triton.jit
    def diffusion_dpo_head(s0, s1, s2, s3, std, beta, p1, p2, inv_b, inv_n, rmask, met_ptr):
        mse_w, mse_l, ref_w, ref_l = K.mses(s0, s1, s2, s3, inv_n)
        logit = -0.5 * beta * ((mse_w - mse_l) - (ref_w - ref_l))
        per_sample = -K.log_sigmoid(logit)
        d_logit = -K.sigmoid_neg(logit) * inv_b
        tl.store(met_ptr + 4, K.mean_b(ref_w, rmask, inv_b).to(tl.float32))
        tl.store(met_ptr + 5, K.mean_b(ref_l, rmask, inv_b).to(tl.float32))
        tl.store(met_ptr + 6, K.mean_b(mse_w - mse_l, rmask, inv_b).to(tl.float32))
        tl.store(met_ptr + 7, K.mean_b(ref_w - ref_l, rmask, inv_b).to(tl.float32))
        coef_w, coef_l = K.mse_outputs(met_ptr, logit, logit, mse_w, mse_l, d_logit * (-0.5 * beta),
                                       d_logit * (0.5 * beta), rmask, inv_b, inv_n)  # fmt: skip
        return per_sample, coef_w, coef_l

    return {"diffusion_dpo": diffusion_dpo_head}
