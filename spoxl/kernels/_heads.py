"""The per-sample ("head") part of every preference loss, shared by both backends.

Each loss splits into (1) per-sample reductions over C*H*W -- MSEs or Gaussian log-ratios, the
memory-bound part that the Triton kernels fuse -- and (2) a little scalar math on [B] vectors
(logsigmoid, clamp, means). Part (2) lives here, once, in plain torch: its cost is O(B), and
autograd through it hands the per-sample gradients back to whichever backend computed part (1).

Every head returns (loss, metrics): metrics is a dict of detached 0-d tensors computed from the
same [B] vectors, so logging them costs no second pass over the latents and no host sync.

The heads compute in fp64 and return fp32. They see only [B] values, so this costs nothing, and
it removes the cancellation in differences of near-equal per-sample values (MaPO's margin is a
difference of two scores near 1; DPO's logit multiplies a small MSE difference by beta/2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NCP_KINDS = ("dpo", "cpo", "sft")


def implicit_accuracy(logit: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose logit favours the winner; ties count one half (diffusers' convention)."""
    return ((logit > 0).float() + 0.5 * (logit == 0).float()).mean()


def _fp64(*values):
    return [None if v is None else v.double() for v in values]


def _finish(loss: torch.Tensor, metrics, dtype: torch.dtype):
    """The loss in the per-sample values' dtype (fp32, or fp64 under gradcheck) and detached fp32
    metrics; `metrics` is a callable so that nothing is computed (no extra launches) unless asked."""
    return loss.to(dtype), ({name: v.detach().float() for name, v in metrics().items()} if metrics else {})


def spo_head(log_ratio_w: torch.Tensor, log_ratio_l: torch.Tensor, beta: float, clip: float, with_metrics=True):
    """SPO from per-sample log pi_theta - log pi_ref of winner and loser.

    r = clamp(exp(log_ratio), 1 - clip, 1 + clip); loss = mean(-logsigmoid(beta log r_w - beta log r_l)).
    torch.clamp passes no gradient where the clamp is active, exactly as the official code.
    """
    dtype = log_ratio_w.dtype
    log_ratio_w, log_ratio_l = _fp64(log_ratio_w, log_ratio_l)
    ratio_w = torch.clamp(torch.exp(log_ratio_w), 1 - clip, 1 + clip)
    ratio_l = torch.clamp(torch.exp(log_ratio_l), 1 - clip, 1 + clip)
    logit = beta * (torch.log(ratio_w) - torch.log(ratio_l))
    loss = -F.logsigmoid(logit).mean()

    def metrics():
        # The clamp is active where exp(log_ratio) lies outside [1 - clip, 1 + clip] (ratio space, as clamp).
        raw = torch.exp(torch.cat([log_ratio_w, log_ratio_l]))
        return {
            "implicit_acc": implicit_accuracy(logit),
            "margin": logit.mean(),
            "log_ratio_w": log_ratio_w.mean(),
            "log_ratio_l": log_ratio_l.mean(),
            "ratio_w": ratio_w.mean(),
            "ratio_l": ratio_l.mean(),
            "clamp_frac": ((raw < 1 - clip) | (raw > 1 + clip)).float().mean(),
        }

    return _finish(loss, with_metrics and metrics, dtype)


def diffusion_dpo_head(mse_w, mse_l, ref_mse_w, ref_mse_l, beta: float, with_metrics=True):
    """Diffusion-DPO: logit = -beta/2 ((mse_w - mse_l) - (ref_mse_w - ref_mse_l)); loss = mean(-logsigmoid)."""
    dtype = mse_w.dtype
    mse_w, mse_l, ref_mse_w, ref_mse_l = _fp64(mse_w, mse_l, ref_mse_w, ref_mse_l)
    model_diff = mse_w - mse_l
    ref_diff = ref_mse_w - ref_mse_l
    logit = -0.5 * beta * (model_diff - ref_diff)
    loss = -F.logsigmoid(logit).mean()

    def metrics():
        return {
            "implicit_acc": implicit_accuracy(logit),
            "margin": logit.mean(),
            "mse_w": mse_w.mean(),
            "mse_l": mse_l.mean(),
            "ref_mse_w": ref_mse_w.mean(),
            "ref_mse_l": ref_mse_l.mean(),
            "model_diff": model_diff.mean(),
            "ref_diff": ref_diff.mean(),
        }

    return _finish(loss, with_metrics and metrics, dtype)


def mapo_score(mse: torch.Tensor, snr: float) -> torch.Tensor:
    """g(m) = s m / (exp(s m) - 1), the bounded MaPO link (1 at m = 0, decreasing in m).

    expm1 keeps precision for small s*m; the m == 0 limit is patched with where() on a safe
    argument so neither value nor gradient turns into NaN.
    """
    sm = snr * mse
    zero = sm == 0
    safe = torch.where(zero, torch.ones_like(sm), sm)
    return torch.where(zero, torch.ones_like(sm), safe / torch.expm1(safe))


def mapo_head(mse_w, mse_l, beta: float, snr: float, num_train_timesteps: int, with_metrics=True):
    """MaPO: mean(mse_w) - beta * mean(logsigmoid(T (g(mse_w) - g(mse_l))))."""
    dtype = mse_w.dtype
    mse_w, mse_l = _fp64(mse_w, mse_l)
    margin = mapo_score(mse_w, snr) - mapo_score(mse_l, snr)
    logit = num_train_timesteps * margin
    loss = mse_w.mean() - beta * F.logsigmoid(logit).mean()

    def metrics():
        return {
            "implicit_acc": implicit_accuracy(logit),
            "margin": margin.mean(),
            "mse_w": mse_w.mean(),
            "mse_l": mse_l.mean(),
        }

    return _finish(loss, with_metrics and metrics, dtype)


def ncp_head(mse_w, mse_l, ref_mse_w, ref_mse_l, beta: float, kind: str, with_metrics=True):
    """NCP objectives in U-Net-feature space; d = mse_w - mse_l.

    dpo: -logsigmoid(beta (d_ref - d_theta)); cpo: -logsigmoid(-beta d_theta); sft: mean(mse_w).
    For cpo and sft the metrics report the reference-free logit -beta d_theta.
    """
    dtype = mse_w.dtype
    mse_w, mse_l, ref_mse_w, ref_mse_l = _fp64(mse_w, mse_l, ref_mse_w, ref_mse_l)
    d_theta = mse_w - mse_l
    d_ref = ref_mse_w - ref_mse_l if kind == "dpo" else None
    logit = beta * (d_ref - d_theta) if kind == "dpo" else -beta * d_theta
    loss = mse_w.mean() if kind == "sft" else -F.logsigmoid(logit).mean()

    def metrics():
        values = {
            "implicit_acc": implicit_accuracy(logit),
            "margin": logit.mean(),
            "mse_w": mse_w.mean(),
            "mse_l": mse_l.mean(),
            "d_theta": d_theta.mean(),
        }
        if d_ref is not None:
            values["d_ref"] = d_ref.mean()
        return values

    return _finish(loss, with_metrics and metrics, dtype)
