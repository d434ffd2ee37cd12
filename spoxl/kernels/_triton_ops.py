"""The Triton backend: autograd.Functions around the kernels and the ops built from them.

Imported lazily by spoxl.kernels.dispatch, only when the triton backend is chosen; with
TRITON_INTERPRET=1 in the environment before this import, the same kernels run on CPU tensors.

Each Function computes per-sample reductions (forward reads every input once) and its backward
launches one light elementwise kernel (reads the inputs again, writes the gradients directly).
The [B]-sized loss math on top is _heads', shared with the torch backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton import knobs

from spoxl import sampling
from spoxl.kernels import _heads
from spoxl.kernels import _triton_kernels as K
from spoxl.kernels._checks import per_sample

# Whether these kernels were decorated as interpreted functions (decided at import time).
INTERPRETED = bool(knobs.runtime.interpret)

MAX_BLOCK = 2048


def _block(n: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(n))


def _launch_config(n: int) -> dict:
    block = _block(n)
    return {"BLOCK": block, "num_warps": 8 if block >= 2048 else 4}


def _acc_dtype(*tensors) -> torch.dtype:
    """fp64 when any input is fp64 (gradcheck), else fp32 -- never accumulate in half precision."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(x.shape[0], -1).contiguous()


def _grid(batch: int, n: int):
    return (batch, triton.cdiv(n, _block(n)))


# ---------------------------------------------------------------------------------------------
# Per-sample squared errors (Diffusion-DPO, MaPO, NCP)


def _squared_errors(pred_w, target_w, pred_l=None, target_l=None, ref_w=None, ref_l=None):
    """[B, 4] per-sample means of (p_w-t_w)^2, (p_l-t_l)^2, (r_w-t_w)^2, (r_l-t_l)^2 (zeros where absent),
    plus the flattened policy tensors the backward needs."""
    has_l, has_ref = pred_l is not None, ref_w is not None
    batch, n = pred_w.shape[0], pred_w[0].numel()
    acc = _acc_dtype(pred_w, pred_l, target_w, target_l, ref_w, ref_l)
    flat = [_flat(t) if t is not None else None for t in (pred_w, target_w, pred_l, target_l, ref_w, ref_l)]
    p_w, t_w, p_l, t_l, r_w, r_l = [f if f is not None else flat[0] for f in flat]
    grid = _grid(batch, n)
    partials = torch.zeros(batch, grid[1], 4, dtype=acc, device=pred_w.device)
    K.sqerr_partials_kernel[grid](
        partials, p_w, t_w, p_l, t_l, r_w, r_l, n, grid[1],
        HAS_L=has_l, HAS_REF=has_ref, ACC=_tl(acc), **_launch_config(n),
    )  # fmt: skip
    return partials.sum(1) / n, (p_w, t_w, p_l, t_l)


def _scaled_diffs(shape, a, b, coef_ab, dtype_ab, c=None, d=None, coef_cd=None, dtype_cd=None):
    """coef_ab[b] * (a - b) (and coef_cd[b] * (c - d)) reshaped to `shape`, in the given dtypes."""
    batch, n = a.shape
    has_second = c is not None
    acc = coef_ab.dtype
    out_ab = torch.empty(batch, n, dtype=dtype_ab, device=a.device)
    out_cd = torch.empty(batch, n, dtype=dtype_cd, device=a.device) if has_second else out_ab
    K.scaled_diff_kernel[_grid(batch, n)](
        out_ab, a, b, coef_ab.contiguous(),
        out_cd, c if has_second else a, d if has_second else b, (coef_cd if has_second else coef_ab).contiguous(),
        n, HAS_SECOND=has_second, ACC=_tl(acc), **_launch_config(n),
    )  # fmt: skip
    return out_ab.view(shape), (out_cd.view(shape) if has_second else None)


class PairSquaredError(torch.autograd.Function):
    """(mse_w, mse_l, ref_mse_w, ref_mse_l) per sample; gradients flow into pred_w and pred_l only.

    ref_w/ref_l may be None (reference-free losses); the matching outputs are then zeros.
    """

    @staticmethod
    def forward(ctx, pred_w, pred_l, target_w, target_l, ref_w, ref_l):
        mse, saved = _squared_errors(pred_w, target_w, pred_l, target_l, ref_w, ref_l)
        ctx.save_for_backward(*saved)
        ctx.meta = (pred_w.shape, pred_w.dtype, pred_l.dtype, pred_w[0].numel())
        outputs = tuple(mse[:, i].contiguous() for i in range(4))
        ctx.mark_non_differentiable(outputs[2], outputs[3])
        return outputs

    @staticmethod
    def backward(ctx, g_w, g_l, _g_ref_w, _g_ref_l):
        p_w, t_w, p_l, t_l = ctx.saved_tensors
        shape, dtype_w, dtype_l, n = ctx.meta
        acc = _acc_dtype(p_w)
        # d mse / d pred = 2 (pred - target) / N.
        grad_w, grad_l = _scaled_diffs(
            shape, p_w, t_w, g_w.to(acc) * (2.0 / n), dtype_w, p_l, t_l, g_l.to(acc) * (2.0 / n), dtype_l
        )
        return grad_w, grad_l, None, None, None, None


# ---------------------------------------------------------------------------------------------
# Gaussian transition log-probabilities (SPO, pool scoring)


class SpoLogRatios(torch.autograd.Function):
    """Per-sample log pi_theta(x|mean) - log pi_ref(x|ref_mean) for w and l; grads into mean_w, mean_l."""

    @staticmethod
    def forward(ctx, x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l, std):
        batch, n = x_w.shape[0], x_w[0].numel()
        acc = _acc_dtype(x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l)
        x_w, x_l, mean_w_f, mean_l_f, ref_w, ref_l = map(_flat, (x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l))
        std = std.to(acc)
        grid = _grid(batch, n)
        partials = torch.empty(batch, grid[1], 2, dtype=acc, device=x_w.device)
        K.logratio_partials_kernel[grid](
            partials, x_w, mean_w_f, ref_w, x_l, mean_l_f, ref_l, n, grid[1], ACC=_tl(acc), **_launch_config(n)
        )
        # log p - log p_ref = mean[(x - ref)^2 - (x - mean)^2] / (2 std^2)
        ratios = partials.sum(1) / (2 * std.unsqueeze(1) ** 2 * n)
        ctx.save_for_backward(x_w, x_l, mean_w_f, mean_l_f, std)
        ctx.meta = (mean_w.shape, mean_w.dtype, mean_l.dtype, acc, n)
        return ratios[:, 0].contiguous(), ratios[:, 1].contiguous()

    @staticmethod
    def backward(ctx, g_w, g_l):
        x_w, x_l, mean_w, mean_l, std = ctx.saved_tensors
        shape, dtype_w, dtype_l, acc, n = ctx.meta
        # d log p / d mean = (x - mean) / (std^2 N); written as coef * (mean - x) with coef < 0.
        scale = -1.0 / (std**2 * n)
        grad_w, grad_l = _scaled_diffs(
            shape, mean_w, x_w, g_w.to(acc) * scale, dtype_w, mean_l, x_l, g_l.to(acc) * scale, dtype_l
        )
        return None, None, grad_w, grad_l, None, None, None


class TransitionLogprob(torch.autograd.Function):
    """[B] mean Gaussian log density of x_prev under (mean, std); gradient into mean."""

    @staticmethod
    def forward(ctx, x_prev, mean, std):
        mse, (m, x, _, _) = _squared_errors(mean, x_prev)
        std = std.to(mse.dtype)
        ctx.save_for_backward(m, x, std)
        ctx.meta = (mean.shape, mean.dtype)
        return -mse[:, 0] / (2 * std**2) - torch.log(std) - sampling.LOG_SQRT_2PI

    @staticmethod
    def backward(ctx, g):
        m, x, std = ctx.saved_tensors
        shape, dtype = ctx.meta
        # d logp / d mean = (x - mean) / (std^2 N), written as coef * (mean - x).
        coef = -g.to(std.dtype) / (std**2 * m.shape[1])
        grad_mean, _ = _scaled_diffs(shape, m, x, coef, dtype)
        return None, grad_mean, None


class PoolLogprobs(torch.autograd.Function):
    """(logp [B, k], ref_logp [B, k]) of all candidates in one pass; grads into mean and ref_mean."""

    @staticmethod
    def forward(ctx, samples, mean, ref_mean, std):
        batch, k = samples.shape[:2]
        n = mean[0].numel()
        acc = _acc_dtype(samples, mean, ref_mean)
        x = samples.detach().reshape(batch, k, n).contiguous()
        m, r = _flat(mean), _flat(ref_mean)
        std = std.to(acc)
        grid = _grid(batch, n)
        partials = torch.empty(batch, grid[1], k, 2, dtype=acc, device=mean.device)
        K.pool_logprob_partials_kernel[grid](partials, x, m, r, n, grid[1], k, ACC=_tl(acc), **_launch_config(n))
        const = (torch.log(std) + sampling.LOG_SQRT_2PI).unsqueeze(1)
        sq = partials.sum(1) / (2 * std.view(batch, 1, 1) ** 2 * n)
        ctx.save_for_backward(x, m, r, std)
        ctx.meta = (mean.shape, mean.dtype, ref_mean.dtype, acc, n)
        return (-sq[..., 0] - const).contiguous(), (-sq[..., 1] - const).contiguous()

    @staticmethod
    def backward(ctx, g, g_ref):
        x, m, r, std = ctx.saved_tensors
        shape, dtype_m, dtype_r, acc, n = ctx.meta
        batch, k = x.shape[:2]
        scale = (1.0 / (std**2 * n)).view(batch, 1)
        coef = torch.stack([g.to(acc) * scale, g_ref.to(acc) * scale], -1).contiguous()
        grad_m = torch.empty(batch, n, dtype=dtype_m, device=m.device)
        grad_r = torch.empty(batch, n, dtype=dtype_r, device=m.device)
        K.pool_logprob_backward_kernel[_grid(batch, n)](
            grad_m, grad_r, x, m, r, coef, n, k, ACC=_tl(acc), **_launch_config(n)
        )
        return None, grad_m.view(shape), grad_r.view(shape), None


# ---------------------------------------------------------------------------------------------
# Ops with the public signatures (inputs already validated by spoxl.kernels.ops)


def _maybe_metrics(loss_and_metrics, return_metrics: bool):
    """(loss, metrics) when asked for, else the loss (the head then computed no metrics at all)."""
    return loss_and_metrics if return_metrics else loss_and_metrics[0]


def _std(std, like: torch.Tensor) -> torch.Tensor:
    return per_sample("std", std, like.shape[0], like.device, _acc_dtype(like))


@torch.no_grad()
def pool_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, k, *, noise=None, seed=None):
    batch, n = x_t.shape[0], x_t[0].numel()
    acc = _acc_dtype(x_t, eps)
    a = per_sample("alpha_bar_t", alpha_bar_t, batch, x_t.device)
    a_prev = per_sample("alpha_bar_prev", alpha_bar_prev, batch, x_t.device)
    std = sampling.ddim_std(a, a_prev, per_sample("eta", eta, batch, x_t.device)).to(x_t.device)
    # The mean's coefficients come from spoxl.sampling evaluated on basis vectors, so the DDIM
    # algebra stays in one place: ddim_mean(x0, eps) = c_x0 * x0 + c_eps * eps.
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    c_x0 = sampling.ddim_mean(one, zero, a_prev, std)
    c_eps = sampling.ddim_mean(zero, one, a_prev, std)
    coefs = [c.to(acc).contiguous() for c in ((1 - a).sqrt(), a.sqrt(), c_x0, c_eps, std)]
    samples = torch.empty(batch, k, *x_t.shape[1:], dtype=x_t.dtype, device=x_t.device)
    mean = torch.empty(x_t.shape, dtype=acc, device=x_t.device)
    if noise is not None:
        noise_arg = noise.detach().reshape(batch, k, n).contiguous()
    else:
        noise_arg = samples  # never read (HAS_NOISE=False); any pointer will do
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    K.pool_step_kernel[_grid(batch, n)](
        samples, mean, _flat(x_t), _flat(eps), noise_arg, *coefs, int(seed or 0), n, k,
        HAS_NOISE=noise is not None, ACC=_tl(acc), **_launch_config(n),
    )  # fmt: skip
    return samples, mean, std


def transition_logprob(x_prev, mean, std):
    return TransitionLogprob.apply(x_prev, mean, _std(std, mean))


def pool_logprobs(samples, mean, ref_mean, std):
    return PoolLogprobs.apply(samples, mean, ref_mean, _std(std, mean))


def spo_loss(x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l, std, beta=10.0, clip=0.1, *, return_metrics=False):
    lr_w, lr_l = SpoLogRatios.apply(x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l, _std(std, mean_w))
    return _maybe_metrics(_heads.spo_head(lr_w, lr_l, beta, clip, return_metrics), return_metrics)


def diffusion_dpo_loss(
    pred_w, pred_l, ref_pred_w, ref_pred_l, target_w, target_l, beta=5000.0, *, return_metrics=False
):
    mse_w, mse_l, ref_w, ref_l = PairSquaredError.apply(pred_w, pred_l, target_w, target_l, ref_pred_w, ref_pred_l)
    return _maybe_metrics(_heads.diffusion_dpo_head(mse_w, mse_l, ref_w, ref_l, beta, return_metrics), return_metrics)


def mapo_loss(
    pred_w, pred_l, target_w, target_l, beta=0.1, snr=0.5, num_train_timesteps=1000, *, return_metrics=False
):
    mse_w, mse_l, _, _ = PairSquaredError.apply(pred_w, pred_l, target_w, target_l, None, None)
    return _maybe_metrics(_heads.mapo_head(mse_w, mse_l, beta, snr, num_train_timesteps, return_metrics), return_metrics)


def ncp_loss(
    feat_w,
    feat_l,
    ref_feat_w,
    ref_feat_l,
    target_feat_w,
    target_feat_l,
    beta=2500.0,
    kind="dpo",
    *,
    return_metrics=False,
):
    refs = (ref_feat_w, ref_feat_l) if kind == "dpo" else (None, None)
    mse_w, mse_l, ref_w, ref_l = PairSquaredError.apply(feat_w, feat_l, target_feat_w, target_feat_l, *refs)
    if kind != "dpo":
        ref_w = ref_l = None
    return _maybe_metrics(_heads.ncp_head(mse_w, mse_l, ref_w, ref_l, beta, kind, return_metrics), return_metrics)
