"""The Triton kernels themselves (imported lazily, only when the triton backend is chosen).

Layout shared by every kernel: a per-sample tensor is viewed as [B, N] (N = C*H*W, contiguous)
and the grid is (B, cdiv(N, BLOCK)); program (b, c) owns elements [c*BLOCK, (c+1)*BLOCK) of
sample b. Reductions are two-phase: each program writes its partial sums to a [B, NCHUNK, ...]
buffer and the host sums the (tiny) chunk axis, which is deterministic, unlike atomics.

Loads are upcast to ACC (fp32, or fp64 for gradcheck), so fp16/bf16 inputs accumulate in fp32.
Stores cast back to the output's dtype. No libdevice calls: the interpreter cannot run them.
Offsets are int64 so B * N beyond 2**31 does not wrap.
"""

import triton
import triton.language as tl


@triton.jit
def _offsets(N, BLOCK: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return pid_b, pid_c, cols, cols < N


@triton.jit
def sqerr_partials_kernel(
    part_ptr,  # [B, NCHUNK, 4] ACC: sums of (p_w-t_w)^2, (p_l-t_l)^2, (r_w-t_w)^2, (r_l-t_l)^2
    p_w_ptr,
    t_w_ptr,
    p_l_ptr,
    t_l_ptr,
    r_w_ptr,
    r_l_ptr,
    N,
    NCHUNK,
    HAS_L: tl.constexpr,
    HAS_REF: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-sample squared-error partials of the pairwise losses; every input is read once."""
    pid_b, pid_c, cols, mask = _offsets(N, BLOCK)
    base = pid_b * N + cols
    out = part_ptr + (pid_b * NCHUNK + pid_c) * 4
    t_w = tl.load(t_w_ptr + base, mask=mask, other=0.0).to(ACC)
    d = tl.load(p_w_ptr + base, mask=mask, other=0.0).to(ACC) - t_w
    tl.store(out + 0, tl.sum(d * d, axis=0))
    if HAS_REF:
        d = tl.load(r_w_ptr + base, mask=mask, other=0.0).to(ACC) - t_w
        tl.store(out + 2, tl.sum(d * d, axis=0))
    if HAS_L:
        t_l = tl.load(t_l_ptr + base, mask=mask, other=0.0).to(ACC)
        d = tl.load(p_l_ptr + base, mask=mask, other=0.0).to(ACC) - t_l
        tl.store(out + 1, tl.sum(d * d, axis=0))
        if HAS_REF:
            d = tl.load(r_l_ptr + base, mask=mask, other=0.0).to(ACC) - t_l
            tl.store(out + 3, tl.sum(d * d, axis=0))


@triton.jit
def logratio_partials_kernel(
    part_ptr,  # [B, NCHUNK, 2] ACC: sums of (x-ref)^2 - (x-mean)^2 for w and l
    x_w_ptr,
    m_w_ptr,
    r_w_ptr,
    x_l_ptr,
    m_l_ptr,
    r_l_ptr,
    N,
    NCHUNK,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """SPO's per-sample log-ratio numerators. The difference is formed per element, so the
    log(std) and log(sqrt(2 pi)) terms cancel exactly instead of in rounded fp32 sums."""
    pid_b, pid_c, cols, mask = _offsets(N, BLOCK)
    base = pid_b * N + cols
    out = part_ptr + (pid_b * NCHUNK + pid_c) * 2
    x = tl.load(x_w_ptr + base, mask=mask, other=0.0).to(ACC)
    dm = x - tl.load(m_w_ptr + base, mask=mask, other=0.0).to(ACC)
    dr = x - tl.load(r_w_ptr + base, mask=mask, other=0.0).to(ACC)
    tl.store(out + 0, tl.sum(dr * dr - dm * dm, axis=0))
    x = tl.load(x_l_ptr + base, mask=mask, other=0.0).to(ACC)
    dm = x - tl.load(m_l_ptr + base, mask=mask, other=0.0).to(ACC)
    dr = x - tl.load(r_l_ptr + base, mask=mask, other=0.0).to(ACC)
    tl.store(out + 1, tl.sum(dr * dr - dm * dm, axis=0))


@triton.jit
def scaled_diff_kernel(
    out_a_ptr,
    a_ptr,
    b_ptr,
    coef_a_ptr,  # [B] ACC
    out_c_ptr,
    c_ptr,
    d_ptr,
    coef_c_ptr,
    N,
    HAS_SECOND: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out_a = coef_a[b] * (a - b) (and out_c = coef_c[b] * (c - d)): every loss backward.

    d mse/d pred = 2 (pred - target) / N and d logp/d mean = (x - mean) / (std^2 N) are both a
    per-sample scale times an elementwise difference, so one light kernel writes all gradients
    without any full-size temporary.
    """
    pid_b, pid_c, cols, mask = _offsets(N, BLOCK)
    base = pid_b * N + cols
    coef = tl.load(coef_a_ptr + pid_b)
    a = tl.load(a_ptr + base, mask=mask, other=0.0).to(ACC)
    b = tl.load(b_ptr + base, mask=mask, other=0.0).to(ACC)
    tl.store(out_a_ptr + base, (coef * (a - b)).to(out_a_ptr.dtype.element_ty), mask=mask)
    if HAS_SECOND:
        coef = tl.load(coef_c_ptr + pid_b)
        c = tl.load(c_ptr + base, mask=mask, other=0.0).to(ACC)
        d = tl.load(d_ptr + base, mask=mask, other=0.0).to(ACC)
        tl.store(out_c_ptr + base, (coef * (c - d)).to(out_c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pool_logprob_partials_kernel(
    part_ptr,  # [B, NCHUNK, K, 2] ACC: sums of (x_j - mean)^2 and (x_j - ref)^2
    x_ptr,  # [B, K, N]
    m_ptr,  # [B, N]
    r_ptr,  # [B, N]
    N,
    NCHUNK,
    K,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Both log-prob reductions of all k candidates; mean and ref are read once for the pool."""
    pid_b, pid_c, cols, mask = _offsets(N, BLOCK)
    base = pid_b * N + cols
    m = tl.load(m_ptr + base, mask=mask, other=0.0).to(ACC)
    r = tl.load(r_ptr + base, mask=mask, other=0.0).to(ACC)
    out = part_ptr + (pid_b * NCHUNK + pid_c) * K * 2
    for j in range(K):
        x = tl.load(x_ptr + (pid_b * K + j) * N + cols, mask=mask, other=0.0).to(ACC)
        dm = x - m
        dr = x - r
        tl.store(out + 2 * j, tl.sum(dm * dm, axis=0))
        tl.store(out + 2 * j + 1, tl.sum(dr * dr, axis=0))


@triton.jit
def pool_logprob_backward_kernel(
    grad_m_ptr,  # [B, N]
    grad_r_ptr,  # [B, N]
    x_ptr,  # [B, K, N]
    m_ptr,
    r_ptr,
    coef_ptr,  # [B, K, 2] ACC: dL/dlogp_j / (std^2 N) and dL/dref_logp_j / (std^2 N)
    N,
    K,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad_mean = sum_j c_j (x_j - mean), grad_ref = sum_j c'_j (x_j - ref), candidates read once."""
    pid_b, pid_c, cols, mask = _offsets(N, BLOCK)
    base = pid_b * N + cols
    m = tl.load(m_ptr + base, mask=mask, other=0.0).to(ACC)
    r = tl.load(r_ptr + base, mask=mask, other=0.0).to(ACC)
    acc_m = tl.zeros([BLOCK], dtype=ACC)
    acc_r = tl.zeros([BLOCK], dtype=ACC)
    for j in range(K):
        x = tl.load(x_ptr + (pid_b * K + j) * N + cols, mask=mask, other=0.0).to(ACC)
        acc_m += tl.load(coef_ptr + (pid_b * K + j) * 2) * (x - m)
        acc_r += tl.load(coef_ptr + (pid_b * K + j) * 2 + 1) * (x - r)
    tl.store(grad_m_ptr + base, acc_m.to(grad_m_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_r_ptr + base, acc_r.to(grad_r_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pool_step_kernel(
    samples_ptr,  # [B, K, N], x_t's dtype
    mean_ptr,  # [B, N] ACC
    x_ptr,  # [B, N]
    eps_ptr,  # [B, N]
    noise_ptr,  # [B, K, N] (only read when HAS_NOISE)
    sqrt_1m_a_ptr,  # [B] ACC: sqrt(1 - a)
    sqrt_a_ptr,  # sqrt(a)
    x0_coef_ptr,  # sqrt(a_prev)
    eps_coef_ptr,  # sqrt(1 - a_prev - std^2)
    std_ptr,
    seed,
    N,
    K,
    HAS_NOISE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One DDIM(eta) step to k candidates: x_t and eps are read once, the shared mean is formed
    in registers (same operation order as spoxl.sampling), and each candidate adds std * z_j.

    Without injected noise, z_j comes from Philox: tl.randn(seed, offset) with a distinct offset
    (b*K + j)*N + n per candidate element, so one seed gives the whole pool reproducibly.
    """
    pid_b, pid_c, cols, mask = _offsets(N, BLOCK)
    base = pid_b * N + cols
    x = tl.load(x_ptr + base, mask=mask, other=0.0).to(ACC)
    e = tl.load(eps_ptr + base, mask=mask, other=0.0).to(ACC)
    x0 = (x - tl.load(sqrt_1m_a_ptr + pid_b) * e) / tl.load(sqrt_a_ptr + pid_b)
    mean = tl.load(x0_coef_ptr + pid_b) * x0 + tl.load(eps_coef_ptr + pid_b) * e
    tl.store(mean_ptr + base, mean, mask=mask)
    std = tl.load(std_ptr + pid_b)
    for j in range(K):
        offs = (pid_b * K + j) * N + cols
        if HAS_NOISE:
            z = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(ACC)
        else:
            z = tl.randn(seed, offs).to(ACC)
        tl.store(samples_ptr + offs, (mean + std * z).to(samples_ptr.dtype.element_ty), mask=mask)
