"""The Triton backend: the sampling ops and the shared launchers and autograd.Functions of
every fused loss (each loss's own math lives in its module, spoxl/kernels/losses/).

Imported lazily (by spoxl.kernels.dispatch and the loss modules), only when the triton backend is
chosen; with TRITON_INTERPRET=1 in the environment before this import, the same kernels run on
CPU tensors.

Losses run as three launches: a shared reduction kernel that reads every input once and writes
per-chunk partial sums, the one-program head kernel that finishes the sums and runs the loss's
head (a @triton.jit function from its module) in fp64, writing the loss, the metrics (one small
tensor: asking for them adds no launch and no host sync) and each sample's gradient coefficient
(gradient in forward, as Liger); in backward one elementwise kernel grad = g * coef[b] * (a - b)
writes the gradients directly. The log-prob ops likewise run a reduction and a head kernel.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import triton
import triton.language as tl
from triton import knobs

from spoxl import sampling
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
# Shared launchers


def _sqerr_partials(pred_w, target_w, pred_l=None, target_l=None, ref_w=None, ref_l=None):
    """[B, NCHUNK, 4] partial sums of (p_w-t_w)^2, (p_l-t_l)^2, (r_w-t_w)^2, (r_l-t_l)^2 (zeros where
    absent), plus the flattened policy tensors the backward needs."""
    has_l, has_ref = pred_l is not None, ref_w is not None
    batch, n = pred_w.shape[0], pred_w[0].numel()
    acc = _acc_dtype(pred_w, pred_l, target_w, target_l, ref_w, ref_l)
    flat = [_flat(t) if t is not None else None for t in (pred_w, target_w, pred_l, target_l, ref_w, ref_l)]
    p_w, t_w, p_l, t_l, r_w, r_l = [f if f is not None else flat[0] for f in flat]
    grid = _grid(batch, n)
    partials = torch.empty(batch, grid[1], 4, dtype=acc, device=pred_w.device)  # the kernel writes every slot
    K.sqerr_partials_kernel[grid](
        partials, p_w, t_w, p_l, t_l, r_w, r_l, n, grid[1],
        HAS_L=has_l, HAS_REF=has_ref, ACC=_tl(acc), **_launch_config(n),
    )  # fmt: skip
    return partials, (p_w, t_w, p_l, t_l)


def _scaled_diffs(shape, a, b, coef_ab, dtype_ab, c=None, d=None, coef_cd=None, dtype_cd=None, g=None):
    """g * coef_ab[b] * (a - b) (and likewise for c, d) reshaped to `shape`, in the given dtypes;
    g is an optional 1-element tensor (the upstream gradient of a scalar loss)."""
    batch, n = a.shape
    has_second = c is not None
    acc = _acc_dtype(a, coef_ab)
    out_ab = torch.empty(batch, n, dtype=dtype_ab, device=a.device)
    out_cd = torch.empty(batch, n, dtype=dtype_cd, device=a.device) if has_second else out_ab
    K.scaled_diff_kernel[_grid(batch, n)](
        out_ab, a, b, coef_ab,
        out_cd, c if has_second else a, d if has_second else b, coef_cd if has_second else coef_ab,
        g if g is not None else coef_ab, n,
        HAS_SECOND=has_second, HAS_G=g is not None, ACC=_tl(acc), **_launch_config(n),
    )  # fmt: skip
    return out_ab.view(shape), (out_cd.view(shape) if has_second else None)


_PARAM_CACHE: dict = {}


def _head_params(params, batch: int, n: int, device) -> torch.Tensor:
    """beta, clip|snr, T, 1/B, 1/N as an fp64 device tensor (float kernel arguments would be
    rounded to fp32), cached so a training loop does not copy it host-to-device every step."""
    key = (tuple(params), batch, n, str(device))
    cached = _PARAM_CACHE.get(key)
    if cached is None:
        if len(_PARAM_CACHE) > 256:
            _PARAM_CACHE.clear()
        cached = torch.tensor([*params, 1.0 / batch, 1.0 / n], dtype=torch.float64, device=device)
        _PARAM_CACHE[key] = cached
    return cached


def _loss_head(head, partials, params, n, std=None):
    """Phase 2 (one program): (loss 0-d, metrics [8] fp32, coef [2, B]) from the chunk partials,
    the loss's math being `head`, a @triton.jit function from its module's triton_heads()."""
    batch, nchunk, width = partials.shape
    device = partials.device
    loss = torch.empty((), dtype=partials.dtype, device=device)
    metrics = torch.empty(8, dtype=torch.float32, device=device)
    coef = torch.empty(2, batch, dtype=partials.dtype, device=device)
    param = _head_params(params, batch, n, device)
    block_b = triton.next_power_of_2(batch)
    block_c = max(1, min(triton.next_power_of_2(nchunk), max(1, 4096 // block_b)))
    K.loss_head_kernel[(1,)](
        loss, metrics, coef, partials, std if std is not None else param, param, batch, nchunk,
        HEAD=head, HAS_STD=std is not None, S=width, BLOCK_B=block_b, BLOCK_C=block_c,
    )  # fmt: skip
    return loss, metrics, coef


# ---------------------------------------------------------------------------------------------
# Fused losses: reduction kernel + head kernel forward (gradient coefficients computed there),
# one elementwise kernel backward.

class FusedPairLoss(torch.autograd.Function):
    """Every MSE-based loss (Diffusion-DPO, MaPO, NCP): (loss, metrics [8], in the order of the
    loss module's METRICS), the loss's math being `head` (its module's triton_heads()).

    Gradients flow into pred_w and pred_l; ref_w/ref_l may be None (MaPO, NCP cpo/sft).
    """

    @staticmethod
    def forward(ctx, head, params, pred_w, pred_l, target_w, target_l, ref_w, ref_l):
        partials, saved = _sqerr_partials(pred_w, target_w, pred_l, target_l, ref_w, ref_l)
        loss, metrics, coef = _loss_head(head, partials, params, pred_w[0].numel())
        ctx.save_for_backward(*saved, coef)
        ctx.meta = (pred_w.shape, pred_w.dtype, pred_l.dtype)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, g_loss, _g_metrics):
        p_w, t_w, p_l, t_l, coef = ctx.saved_tensors
        shape, dtype_w, dtype_l = ctx.meta
        grad_w, grad_l = _scaled_diffs(
            shape, p_w, t_w, coef[0], dtype_w, p_l, t_l, coef[1], dtype_l, g=g_loss.reshape(1).contiguous()
        )
        return None, None, grad_w, grad_l, None, None, None, None


class FusedSpoLoss(torch.autograd.Function):
    """Log-ratio losses (SPO): (loss, metrics [8], in the order of the loss module's METRICS), the
    loss's math being `head`; gradients into mean_w and mean_l.

    The reduction forms (x - ref)^2 - (x - mean)^2 per element, so the log(std) and
    log(sqrt(2 pi)) terms cancel exactly instead of between two rounded sums.
    """

    @staticmethod
    def forward(ctx, head, params, x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l, std):
        batch, n = x_w.shape[0], x_w[0].numel()
        acc = _acc_dtype(x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l)
        x_w, x_l, m_w, m_l, r_w, r_l = map(_flat, (x_w, x_l, mean_w, mean_l, ref_mean_w, ref_mean_l))
        grid = _grid(batch, n)
        partials = torch.empty(batch, grid[1], 2, dtype=acc, device=x_w.device)
        K.logratio_partials_kernel[grid](
            partials, x_w, m_w, r_w, x_l, m_l, r_l, n, grid[1], ACC=_tl(acc), **_launch_config(n)
        )
        loss, metrics, coef = _loss_head(head, partials, params, n, std=std.to(acc).contiguous())
        ctx.save_for_backward(x_w, x_l, m_w, m_l, coef)
        ctx.meta = (mean_w.shape, mean_w.dtype, mean_l.dtype)
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, g_loss, _g_metrics):
        x_w, x_l, m_w, m_l, coef = ctx.saved_tensors
        shape, dtype_w, dtype_l = ctx.meta
        grad_w, grad_l = _scaled_diffs(
            shape, m_w, x_w, coef[0], dtype_w, m_l, x_l, coef[1], dtype_l, g=g_loss.reshape(1).contiguous()
        )
        return None, None, None, None, grad_w, grad_l, None, None, None


def _logprobs_forward(samples, mean, ref_mean, std):
    """(logp [B, K], ref_logp [B, K] or None) in two launches: the partials and the head."""
    batch, k = samples.shape[:2]
    n = mean[0].numel()
    has_ref = ref_mean is not None
    acc = _acc_dtype(samples, mean, ref_mean)
    x = samples.detach().reshape(batch, k, n).contiguous()
    m = _flat(mean)
    r = _flat(ref_mean) if has_ref else m
    std = std.to(acc)
    grid = _grid(batch, n)
    partials = torch.empty(batch, grid[1], k, 2, dtype=acc, device=mean.device)
    K.pool_logprob_partials_kernel[grid](partials, x, m, r, n, grid[1], k, HAS_REF=has_ref, ACC=_tl(acc),
                                         **_launch_config(n))  # fmt: skip
    logp = torch.empty(batch, k, dtype=acc, device=mean.device)
    ref_logp = torch.empty(batch, k, dtype=acc, device=mean.device) if has_ref else logp
    param = _head_params((sampling.LOG_SQRT_2PI,), batch, n, mean.device)
    K.logprob_head_kernel[(batch,)](
        logp, ref_logp, partials, std, param, grid[1], k, HAS_REF=has_ref,
        BLOCK_C=min(64, triton.next_power_of_2(grid[1])), BLOCK_K=triton.next_power_of_2(k),
    )  # fmt: skip
    return (x, m, r, std, param), logp, (ref_logp if has_ref else None)


def _logprobs_backward(saved, meta, g, g_ref):
    """(grad_mean, grad_ref_mean or None) in one launch; g/g_ref None = zero (not materialised)."""
    x, m, r, std, param = saved
    shape, dtype_m, dtype_r, acc, n, has_ref = meta
    batch, k = x.shape[:2]
    grad_m = torch.empty(batch, n, dtype=dtype_m, device=m.device)
    grad_r = torch.empty(batch, n, dtype=dtype_r, device=m.device) if has_ref else grad_m
    K.pool_logprob_backward_kernel[_grid(batch, n)](
        grad_m, grad_r, x, m, r, g if g is not None else std, g_ref if g_ref is not None else std, std, param,
        n, k, HAS_REF=has_ref, HAS_G=g is not None, HAS_G_REF=g_ref is not None, ACC=_tl(acc),
        **_launch_config(n),
    )  # fmt: skip
    return grad_m.view(shape), (grad_r.view(shape) if has_ref else None)


class TransitionLogprob(torch.autograd.Function):
    """[B] mean Gaussian log density of x_prev under (mean, std); gradient into mean. The pool
    kernels with k = 1 and no reference: 2 launches forward, 1 backward."""

    @staticmethod
    def forward(ctx, x_prev, mean, std):
        ctx.set_materialize_grads(False)
        saved, logp, _ = _logprobs_forward(x_prev.unsqueeze(1), mean, None, std)
        ctx.save_for_backward(*saved)
        ctx.meta = (mean.shape, mean.dtype, mean.dtype, logp.dtype, mean[0].numel(), False)
        return logp.view(mean.shape[0])

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None
        grad_mean, _ = _logprobs_backward(ctx.saved_tensors, ctx.meta, g.contiguous(), None)
        return None, grad_mean, None


class PoolLogprobs(torch.autograd.Function):
    """(logp [B, k], ref_logp [B, k]) of all candidates in one pass; grads into mean and ref_mean.
    2 launches forward, 1 backward."""

    @staticmethod
    def forward(ctx, samples, mean, ref_mean, std):
        ctx.set_materialize_grads(False)
        saved, logp, ref_logp = _logprobs_forward(samples, mean, ref_mean, std)
        ctx.save_for_backward(*saved)
        ctx.meta = (mean.shape, mean.dtype, ref_mean.dtype, logp.dtype, mean[0].numel(), True)
        return logp, ref_logp

    @staticmethod
    def backward(ctx, g, g_ref):
        if g is None and g_ref is None:
            return None, None, None, None
        grad_m, grad_r = _logprobs_backward(ctx.saved_tensors, ctx.meta, None if g is None else g.contiguous(),
                                            None if g_ref is None else g_ref.contiguous())  # fmt: skip
        return None, grad_m, grad_r, None


def per_sample_std(std, like: torch.Tensor) -> torch.Tensor:
    return per_sample("std", std, like.shape[0], like.device, _acc_dtype(like))


class _HostMath(threading.local):
    active = False


HOST_MATH = _HostMath()


@contextlib.contextmanager
def host_math():
    """Scalar math on the host (1-element CPU tensors, Python floats): no device launch and no
    device sync, however it looks to a dispatch-mode counter on a CPU-only machine, where host
    and device are the same; benchmarks/gpu_check.py's launch counter skips what runs in here."""
    HOST_MATH.active = True
    try:
        yield
    finally:
        HOST_MATH.active = False


def _host_value(v):
    """v as a 1-element CPU fp32 tensor when it is ONE value on the host (a number, or a
    1-element CPU tensor such as scheduler.alphas_cumprod[t]); None for device or per-sample
    tensors. Host values become kernel arguments: no host-to-device copy, no sync."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return torch.tensor([float(v)], dtype=torch.float32)
    if isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.numel() == 1:
        return v.detach().to(torch.float32).reshape(1)
    return None


def _ddim_coefficients(a, a_prev, eta) -> tuple:
    """(sqrt(1 - a), sqrt(a), x0 coefficient, eps coefficient, std) of a DDIM step, from
    spoxl.sampling evaluated on basis vectors (the DDIM algebra stays in one place):
    ddim_mean(x0, eps) = c_x0 * x0 + c_eps * eps. Works on [B] or [1] tensors alike."""
    std = sampling.ddim_std(a, a_prev, eta).to(a.device)
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    c_x0 = sampling.ddim_mean(one, zero, a_prev, std)
    c_eps = sampling.ddim_mean(zero, one, a_prev, std)
    return (1 - a).sqrt(), a.sqrt(), c_x0, c_eps, std


POOL_STEP_MIN_BLOCK = 16  # four quarters of at least 4 elements (one Philox call gives 4 normals)


@torch.no_grad()
def pool_step(x_t, eps, alpha_bar_t, alpha_bar_prev, eta, k, *, noise=None, seed=None, return_logprob=False):
    batch, n = x_t.shape[0], x_t[0].numel()
    acc = _acc_dtype(x_t, eps)
    device = x_t.device
    with host_math():
        host = [_host_value(v) for v in (alpha_bar_t, alpha_bar_prev, eta)]
    scalar = all(h is not None for h in host)
    if scalar:  # one timestep for the batch: five floats, computed on the host in fp32 as the reference
        with host_math():
            values = [float(c) for c in _ddim_coefficients(*host)]
        coef_ptrs = [x_t] * 5  # never read (SCALAR=True)
    else:
        a = per_sample("alpha_bar_t", alpha_bar_t, batch, device)
        a_prev = per_sample("alpha_bar_prev", alpha_bar_prev, batch, device)
        coefs = _ddim_coefficients(a, a_prev, per_sample("eta", eta, batch, device))
        coef_ptrs = [c.to(acc).contiguous() for c in coefs]
        values = [0.0] * 5
    block = max(POOL_STEP_MIN_BLOCK, _block(n))
    nchunk = triton.cdiv(n, block)
    samples = torch.empty(batch, k, *x_t.shape[1:], dtype=x_t.dtype, device=device)
    mean = torch.empty(x_t.shape, dtype=acc, device=device)
    std = torch.empty(batch, dtype=acc, device=device)
    partials = torch.empty(batch, nchunk, k, 2, dtype=acc, device=device) if return_logprob else mean
    if noise is not None:
        noise_arg = noise.detach().reshape(batch, k, n).contiguous()
    else:
        noise_arg = samples  # never read (HAS_NOISE=False); any pointer will do
        if seed is None:
            with host_math():
                seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # the host's global RNG: no device sync
    K.pool_step_kernel[(batch, nchunk)](
        samples, mean, std, partials, _flat(x_t), _flat(eps), noise_arg, *coef_ptrs, *values, int(seed or 0),
        n, nchunk, k, HAS_NOISE=noise is not None, SCALAR=scalar, WITH_LOGP=return_logprob, ACC=_tl(acc),
        BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )  # fmt: skip
    if not return_logprob:
        return samples, mean, std
    logp = torch.empty(batch, k, dtype=acc, device=device)
    param = _head_params((sampling.LOG_SQRT_2PI,), batch, n, device)
    K.logprob_head_kernel[(batch,)](
        logp, logp, partials, std, param, nchunk, k, HAS_REF=False,
        BLOCK_C=min(64, triton.next_power_of_2(nchunk)), BLOCK_K=triton.next_power_of_2(k),
    )  # fmt: skip
    return samples, mean, std, logp


def transition_logprob(x_prev, mean, std):
    return TransitionLogprob.apply(x_prev, mean, per_sample_std(std, mean))


def pool_logprobs(samples, mean, ref_mean, std):
    return PoolLogprobs.apply(samples, mean, ref_mean, per_sample_std(std, mean))


def with_metrics(names, loss, metrics, return_metrics: bool):
    """(loss, {name: 0-d view}) when asked for, else the loss. The fused head wrote the metrics in
    the same launch as the loss: handing them out costs nothing (no copy, no launch), and they are
    only read (a host sync) where the logger reads them."""
    return (loss, {name: metrics[i] for i, name in enumerate(names)}) if return_metrics else loss
