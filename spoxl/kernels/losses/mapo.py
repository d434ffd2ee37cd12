"""MaPO, the reference-free margin-aware loss (methods.md 3): reference, head, fused Triton path.

loss = mean(mse_w) - beta mean(logsigmoid(T (g(mse_w) - g(mse_l)))), g(m) = s m / (exp(s m) - 1)
with s the SNR hyperparameter and T the number of training timesteps (the official scaling).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from spoxl.errors import SpoxlError
from spoxl.kernels import _checks
from spoxl.kernels.losses import _common as C

METRICS = ("implicit_acc", "margin", "mse_w", "mse_l")
REDUCTION = "sqerr"


def mapo_loss(pred_w, pred_l, target_w, target_l, *, beta, snr, num_train_timesteps, return_metrics=False):
    """MaPO: mean(mse_w) - beta mean(logsigmoid(T (g(mse_w) - g(mse_l)))), g(m) = s m / (exp(s m) - 1).
    Gradients into pred_w and pred_l. Metrics: implicit_acc, margin (g_w - g_l), mse_w, mse_l."""
    _checks.same_shape({"pred_w": pred_w, "pred_l": pred_l, "target_w": target_w, "target_l": target_l})
    if not snr > 0:
        raise SpoxlError(f"snr must be > 0, got {snr}")
    impl = fused if C.uses_triton(pred_w.device) else reference
    return impl(pred_w, pred_l, target_w, target_l, beta=beta, snr=snr, num_train_timesteps=num_train_timesteps,
                return_metrics=return_metrics)  # fmt: skip


def score(mse: torch.Tensor, snr: float) -> torch.Tensor:
    """g(m) = s m / (exp(s m) - 1), the bounded MaPO link (1 at m = 0, decreasing in m).

    expm1 keeps precision for small s*m; the m == 0 limit is patched with where() on a safe
    argument so neither value nor gradient turns into NaN.
    """
    sm = snr * mse
    zero = sm == 0
    safe = torch.where(zero, torch.ones_like(sm), sm)
    return torch.where(zero, torch.ones_like(sm), safe / torch.expm1(safe))


def head(mse_w, mse_l, beta: float, snr: float, num_train_timesteps: int, with_metrics=True):
    """(loss, metrics) from the per-sample MSEs of winner and loser, in fp64."""
    dtype = mse_w.dtype
    mse_w, mse_l = C.fp64(mse_w, mse_l)
    margin = score(mse_w, snr) - score(mse_l, snr)
    logit = num_train_timesteps * margin
    loss = mse_w.mean() - beta * F.logsigmoid(logit).mean()

    def metrics():
        return {
            "implicit_acc": C.implicit_accuracy(logit),
            "margin": margin.mean(),
            "mse_w": mse_w.mean(),
            "mse_l": mse_l.mean(),
        }

    return C.finish(loss, with_metrics and metrics, dtype)


def reference(pred_w, pred_l, target_w, target_l, *, beta, snr, num_train_timesteps, return_metrics=False):
    """Plain torch autograd: per-sample MSEs, then `head`."""
    out = head(C.per_sample_mse(pred_w, target_w), C.per_sample_mse(pred_l, target_l), beta, snr,
               num_train_timesteps, return_metrics)  # fmt: skip
    return C.maybe_metrics(out, return_metrics)


def fused(pred_w, pred_l, target_w, target_l, *, beta, snr, num_train_timesteps, return_metrics=False):
    """Triton: the shared squared-error reduction (no reference inputs), `triton_heads()`, one backward."""
    T = C.triton_ops()
    params = (float(beta), float(snr), float(num_train_timesteps))
    loss, metrics = T.FusedPairLoss.apply(triton_heads()["mapo"], params, pred_w, pred_l, target_w, target_l, None, None)
    return T.with_metrics(METRICS, loss, metrics, return_metrics)


# Bound by triton_heads() on first use (_common.bind_triton; helpers too: module globals, not closures).
tl = K = score_and_slope = None


@functools.cache
def triton_heads() -> dict:
    """{variant: `head` as a Triton device function for the shared loss head kernel}, built on first use."""
    global score_and_slope
    C.bind_triton(globals())
    import triton

    @triton.jit
    def score_and_slope(m, snr):
        # g(m) = s m / (exp(s m) - 1) and its derivative; the m = 0 limits are 1 and -s/2.
        sm = snr * m
        zero = sm == 0.0
        safe = tl.where(zero, 1.0, sm)
        e = tl.exp(safe)
        g = tl.where(zero, 1.0, safe / (e - 1.0))
        dg = tl.where(zero, -0.5 * snr, snr * ((e - 1.0) - safe * e) / ((e - 1.0) * (e - 1.0)))
        return g, dg

    @triton.jit
    def mapo_head(s0, s1, s2, s3, std, beta, snr, num_train_timesteps, inv_b, inv_n, rmask, met_ptr):
        mse_w, mse_l, _ref_w, _ref_l = K.mses(s0, s1, s2, s3, inv_n)
        g_w, dg_w = score_and_slope(mse_w, snr)
        g_l, dg_l = score_and_slope(mse_l, snr)
        logit = num_train_timesteps * (g_w - g_l)
        per_sample = mse_w - beta * K.log_sigmoid(logit)
        d_logit = -beta * K.sigmoid_neg(logit) * inv_b
        coef_w, coef_l = K.mse_outputs(met_ptr, logit, g_w - g_l, mse_w, mse_l,
                                       inv_b + d_logit * num_train_timesteps * dg_w,
                                       -d_logit * num_train_timesteps * dg_l, rmask, inv_b, inv_n)  # fmt: skip
        return per_sample, coef_w, coef_l

    return {"mapo": mapo_head}
