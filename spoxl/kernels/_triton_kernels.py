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
    zero = tl.sum(tl.zeros([BLOCK], dtype=ACC), axis=0)  # absent slots are written too: no zero-fill launch
    if HAS_REF:
        d = tl.load(r_w_ptr + base, mask=mask, other=0.0).to(ACC) - t_w
        tl.store(out + 2, tl.sum(d * d, axis=0))
    else:
        tl.store(out + 2, zero)
    if HAS_L:
        t_l = tl.load(t_l_ptr + base, mask=mask, other=0.0).to(ACC)
        d = tl.load(p_l_ptr + base, mask=mask, other=0.0).to(ACC) - t_l
        tl.store(out + 1, tl.sum(d * d, axis=0))
        if HAS_REF:
            d = tl.load(r_l_ptr + base, mask=mask, other=0.0).to(ACC) - t_l
            tl.store(out + 3, tl.sum(d * d, axis=0))
        else:
            tl.store(out + 3, zero)
    else:
        tl.store(out + 1, zero)
        tl.store(out + 3, zero)


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
    g_ptr,  # [1]: the upstream gradient of a scalar loss (read only when HAS_G)
    N,
    HAS_SECOND: tl.constexpr,
    HAS_G: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out_a = g * coef_a[b] * (a - b) (and out_c likewise): every backward in this package.

    d mse/d pred = 2 (pred - target) / N and d logp/d mean = (x - mean) / (std^2 N) are both a
    per-sample scale times an elementwise difference, so one light kernel writes all gradients
    without any full-size temporary. Reading g from memory (instead of scaling the coefficients
    on the host first) saves a launch and a host sync for the common grad_output == 1.
    """
    pid_b, pid_c, cols, mask = _offsets(N, BLOCK)
    base = pid_b * N + cols
    g = 1.0
    if HAS_G:
        g = tl.load(g_ptr).to(ACC)
    coef = tl.load(coef_a_ptr + pid_b).to(ACC) * g
    a = tl.load(a_ptr + base, mask=mask, other=0.0).to(ACC)
    b = tl.load(b_ptr + base, mask=mask, other=0.0).to(ACC)
    tl.store(out_a_ptr + base, (coef * (a - b)).to(out_a_ptr.dtype.element_ty), mask=mask)
    if HAS_SECOND:
        coef = tl.load(coef_c_ptr + pid_b).to(ACC) * g
        c = tl.load(c_ptr + base, mask=mask, other=0.0).to(ACC)
        d = tl.load(d_ptr + base, mask=mask, other=0.0).to(ACC)
        tl.store(out_c_ptr + base, (coef * (c - d)).to(out_c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pool_logprob_partials_kernel(
    part_ptr,  # [B, NCHUNK, K, 2] ACC: sums of (x_j - mean)^2 and (x_j - ref)^2 (0 without ref)
    x_ptr,  # [B, K, N]
    m_ptr,  # [B, N]
    r_ptr,  # [B, N] (read only when HAS_REF)
    N,
    NCHUNK,
    K,
    HAS_REF: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Both log-prob reductions of all k candidates; mean and ref are read once for the pool.
    transition_logprob is the case K = 1 without a reference."""
    pid_b, pid_c, cols, mask = _offsets(N, BLOCK)
    base = pid_b * N + cols
    m = tl.load(m_ptr + base, mask=mask, other=0.0).to(ACC)
    if HAS_REF:
        r = tl.load(r_ptr + base, mask=mask, other=0.0).to(ACC)
    out = part_ptr + (pid_b * NCHUNK + pid_c) * K * 2
    for j in range(K):
        x = tl.load(x_ptr + (pid_b * K + j) * N + cols, mask=mask, other=0.0).to(ACC)
        dm = x - m
        tl.store(out + 2 * j, tl.sum(dm * dm, axis=0))
        if HAS_REF:
            dr = x - r
            tl.store(out + 2 * j + 1, tl.sum(dr * dr, axis=0))
        else:
            tl.store(out + 2 * j + 1, tl.sum(dm * 0.0, axis=0))


@triton.jit
def logprob_head_kernel(
    logp_ptr,  # [B, K] ACC
    ref_logp_ptr,  # [B, K] ACC (written only when HAS_REF)
    part_ptr,  # [B, NCHUNK, K, 2] ACC
    std_ptr,  # [B] ACC
    param_ptr,  # fp64 [3]: log(sqrt(2 pi)), 1/B, 1/N
    NCHUNK,
    K,
    HAS_REF: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per sample: finish the chunk sums of every candidate and write its mean
    Gaussian log density, -sum/(2 std^2 N) - log(std) - log(sqrt(2 pi)) (as spoxl.sampling)."""
    b = tl.program_id(0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < K
    s_m = tl.zeros([BLOCK_K], dtype=tl.float64)
    s_r = tl.zeros([BLOCK_K], dtype=tl.float64)
    for c0 in range(0, NCHUNK, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        m2 = (cs[:, None] < NCHUNK) & kmask[None, :]
        at = part_ptr + ((b * NCHUNK + cs[:, None]) * K + ks[None, :]) * 2
        s_m += tl.sum(tl.load(at, mask=m2, other=0.0).to(tl.float64), axis=0)
        if HAS_REF:
            s_r += tl.sum(tl.load(at + 1, mask=m2, other=0.0).to(tl.float64), axis=0)
    log_sqrt_2pi = tl.load(param_ptr)
    inv_n = tl.load(param_ptr + 2)
    std = tl.load(std_ptr + b).to(tl.float64)
    scale = inv_n / (2.0 * std * std)
    const = tl.log(std) + log_sqrt_2pi
    out_ty = logp_ptr.dtype.element_ty
    tl.store(logp_ptr + b * K + ks, (-s_m * scale - const).to(out_ty), mask=kmask)
    if HAS_REF:
        tl.store(ref_logp_ptr + b * K + ks, (-s_r * scale - const).to(out_ty), mask=kmask)


@triton.jit
def pool_logprob_backward_kernel(
    grad_m_ptr,  # [B, N]
    grad_r_ptr,  # [B, N] (written only when HAS_REF)
    x_ptr,  # [B, K, N]
    m_ptr,
    r_ptr,
    g_ptr,  # [B, K] upstream gradient of logp (read only when HAS_G; else it is zero)
    g_ref_ptr,  # [B, K] upstream gradient of ref_logp (read only when HAS_G_REF)
    std_ptr,  # [B] ACC
    param_ptr,  # fp64 [3]: log(sqrt(2 pi)), 1/B, 1/N
    N,
    K,
    HAS_REF: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_G_REF: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad_mean = sum_j c_j (x_j - mean), grad_ref = sum_j c'_j (x_j - ref), c_j = g_j / (std^2 N):
    the candidates are read once and the coefficients formed here, not by torch ops."""
    pid_b, pid_c, cols, mask = _offsets(N, BLOCK)
    base = pid_b * N + cols
    std = tl.load(std_ptr + pid_b).to(ACC)
    scale = tl.load(param_ptr + 2).to(ACC) / (std * std)
    m = tl.load(m_ptr + base, mask=mask, other=0.0).to(ACC)
    acc_m = tl.zeros([BLOCK], dtype=ACC)
    acc_r = tl.zeros([BLOCK], dtype=ACC)
    if HAS_REF:
        r = tl.load(r_ptr + base, mask=mask, other=0.0).to(ACC)
    for j in range(K):
        x = tl.load(x_ptr + (pid_b * K + j) * N + cols, mask=mask, other=0.0).to(ACC)
        if HAS_G:
            acc_m += tl.load(g_ptr + pid_b * K + j).to(ACC) * scale * (x - m)
        if HAS_REF:
            if HAS_G_REF:
                acc_r += tl.load(g_ref_ptr + pid_b * K + j).to(ACC) * scale * (x - r)
    tl.store(grad_m_ptr + base, acc_m.to(grad_m_ptr.dtype.element_ty), mask=mask)
    if HAS_REF:
        tl.store(grad_r_ptr + base, acc_r.to(grad_r_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["seed", "sqrt_1m_a", "sqrt_a", "x0_coef", "eps_coef", "std_value"])
def pool_step_kernel(
    samples_ptr,  # [B, K, N], x_t's dtype
    mean_ptr,  # [B, N] ACC
    std_out_ptr,  # [B] ACC: written by chunk 0 of each sample (SCALAR: from std_value)
    part_ptr,  # [B, NCHUNK, K, 2] ACC: sums of (sample_j - mean)^2 (written only when WITH_LOGP)
    x_ptr,  # [B, N]
    eps_ptr,  # [B, N]
    noise_ptr,  # [B, K, N] (only read when HAS_NOISE)
    sqrt_1m_a_ptr,  # [B] ACC: sqrt(1 - a)          (per-sample path, SCALAR False)
    sqrt_a_ptr,  # sqrt(a)
    x0_coef_ptr,  # sqrt(a_prev)
    eps_coef_ptr,  # sqrt(1 - a_prev - std^2)
    std_ptr,
    sqrt_1m_a,  # the same five as scalars (SCALAR True: one timestep for the whole batch)
    sqrt_a,
    x0_coef,
    eps_coef,
    std_value,
    seed,
    N,
    NCHUNK,
    K,
    HAS_NOISE: tl.constexpr,
    SCALAR: tl.constexpr,
    WITH_LOGP: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One DDIM(eta) step to k candidates: x_t and eps are read once, the shared mean is formed
    in registers (same operation order as spoxl.sampling), and each candidate adds std * z_j.

    The block is handled as four quarters so that ONE Philox call (tl.randn4x) gives the normals
    of four elements: element pid_c*BLOCK + q*BLOCK/4 + c of candidate (b, j) takes normal q of
    counter (b*K + j) * NCHUNK*BLOCK/4 + pid_c*BLOCK/4 + c. The seed is not specialised (no
    recompile per seed). With WITH_LOGP, the squared distance of each STORED candidate to the
    mean is summed per chunk for logprob_head_kernel: the log-probs equal transition_logprob's.
    """
    Q: tl.constexpr = BLOCK // 4
    pid_b = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1).to(tl.int64)
    if SCALAR:
        c_1m_a = sqrt_1m_a
        c_a = sqrt_a
        c_x0 = x0_coef
        c_eps = eps_coef
        std = std_value
    else:
        c_1m_a = tl.load(sqrt_1m_a_ptr + pid_b)
        c_a = tl.load(sqrt_a_ptr + pid_b)
        c_x0 = tl.load(x0_coef_ptr + pid_b)
        c_eps = tl.load(eps_coef_ptr + pid_b)
        std = tl.load(std_ptr + pid_b)
    if pid_c == 0:
        tl.store(std_out_ptr + pid_b, std)
    quarter = tl.arange(0, Q).to(tl.int64)
    # The four quarters' columns and shared means, kept in registers for every candidate.
    cols0 = pid_c * BLOCK + quarter
    cols1 = cols0 + Q
    cols2 = cols0 + 2 * Q
    cols3 = cols0 + 3 * Q
    m0 = _ddim_mean(mean_ptr, x_ptr, eps_ptr, pid_b * N, cols0, N, c_1m_a, c_a, c_x0, c_eps, ACC)
    m1 = _ddim_mean(mean_ptr, x_ptr, eps_ptr, pid_b * N, cols1, N, c_1m_a, c_a, c_x0, c_eps, ACC)
    m2 = _ddim_mean(mean_ptr, x_ptr, eps_ptr, pid_b * N, cols2, N, c_1m_a, c_a, c_x0, c_eps, ACC)
    m3 = _ddim_mean(mean_ptr, x_ptr, eps_ptr, pid_b * N, cols3, N, c_1m_a, c_a, c_x0, c_eps, ACC)
    for j in range(K):
        row = pid_b * K + j
        if HAS_NOISE:
            z0 = tl.load(noise_ptr + row * N + cols0, mask=cols0 < N, other=0.0)
            z1 = tl.load(noise_ptr + row * N + cols1, mask=cols1 < N, other=0.0)
            z2 = tl.load(noise_ptr + row * N + cols2, mask=cols2 < N, other=0.0)
            z3 = tl.load(noise_ptr + row * N + cols3, mask=cols3 < N, other=0.0)
        else:
            z0, z1, z2, z3 = tl.randn4x(seed, row * NCHUNK * Q + pid_c * Q + quarter)
        sq = _candidate(samples_ptr, row * N, cols0, N, m0, std, z0, ACC)
        sq += _candidate(samples_ptr, row * N, cols1, N, m1, std, z1, ACC)
        sq += _candidate(samples_ptr, row * N, cols2, N, m2, std, z2, ACC)
        sq += _candidate(samples_ptr, row * N, cols3, N, m3, std, z3, ACC)
        if WITH_LOGP:
            at = part_ptr + ((pid_b * NCHUNK + pid_c) * K + j) * 2
            tl.store(at, tl.sum(sq, axis=0))
            tl.store(at + 1, tl.sum(sq * 0.0, axis=0))


@triton.jit
def _ddim_mean(mean_ptr, x_ptr, eps_ptr, row_start, cols, N, c_1m_a, c_a, c_x0, c_eps, ACC: tl.constexpr):
    """The DDIM mean of some columns of one sample, stored and returned (spoxl.sampling's order)."""
    mask = cols < N
    x = tl.load(x_ptr + row_start + cols, mask=mask, other=0.0).to(ACC)
    e = tl.load(eps_ptr + row_start + cols, mask=mask, other=0.0).to(ACC)
    x0 = (x - c_1m_a * e) / c_a
    mean = c_x0 * x0 + c_eps * e
    tl.store(mean_ptr + row_start + cols, mean, mask=mask)
    return mean


@triton.jit
def _candidate(samples_ptr, row_start, cols, N, mean, std, z, ACC: tl.constexpr):
    """Store mean + std * z for some columns of one candidate; returns the squared distance of
    the STORED (rounded) values to the mean (0 outside N)."""
    mask = cols < N
    sample = (mean + std * z.to(ACC)).to(samples_ptr.dtype.element_ty)
    tl.store(samples_ptr + row_start + cols, sample, mask=mask)
    d = tl.where(mask, sample.to(ACC) - mean, 0.0)
    return d * d


# Helpers the loss modules' Triton heads call (spoxl/kernels/losses/*.py, triton_heads()).


@triton.jit
def log_sigmoid(x):
    # Stable for either sign without libdevice's log1p: min(x, 0) - log(1 + exp(-|x|)).
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def sigmoid_neg(x):
    # sigmoid(-x) = d(-logsigmoid(x))/dx magnitude, without overflow for large |x|.
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, z / (1.0 + z), 1.0 / (1.0 + z))


@triton.jit
def mean_b(v, rmask, inv_b):
    return tl.sum(tl.where(rmask, v, 0.0), axis=0) * inv_b


@triton.jit
def implicit_acc(logit, rmask, inv_b):
    # pairs whose logit favours the winner; ties count one half (diffusers' convention)
    return mean_b(tl.where(logit > 0, 1.0, tl.where(logit == 0, 0.5, 0.0)), rmask, inv_b)


@triton.jit
def mses(s0, s1, s2, s3, inv_n):
    # per-sample MSEs of pred_w, pred_l, ref_w, ref_l from the squared-error sums
    return s0 * inv_n, s1 * inv_n, s2 * inv_n, s3 * inv_n


@triton.jit
def mse_outputs(met_ptr, logit, margin, mse_w, mse_l, d_w, d_l, rmask, inv_b, inv_n):
    """The metrics every MSE loss shares (slots 0-3: implicit_acc, margin, mse_w, mse_l), and the
    input-gradient coefficients from dL/d mse: d mse / d pred = 2 (pred - target) / N."""
    tl.store(met_ptr + 0, implicit_acc(logit, rmask, inv_b).to(tl.float32))
    tl.store(met_ptr + 1, mean_b(margin, rmask, inv_b).to(tl.float32))
    tl.store(met_ptr + 2, mean_b(mse_w, rmask, inv_b).to(tl.float32))
    tl.store(met_ptr + 3, mean_b(mse_l, rmask, inv_b).to(tl.float32))
    return d_w * 2.0 * inv_n, d_l * 2.0 * inv_n


@triton.jit
def loss_head_kernel(
    loss_ptr,  # [1] the loss (fp32, or fp64 under gradcheck)
    met_ptr,  # [8] fp32 metrics, in the order of the loss module's METRICS
    coef_ptr,  # [2, B] ACC: per-sample input-gradient scales for the w and l tensors
    part_ptr,  # [B, NCHUNK, S] ACC partial sums from the reduction kernel
    std_ptr,  # [B] (HAS_STD only: SPO)
    param_ptr,  # fp64 [5]: beta, two loss parameters (SPO clip; MaPO snr, T), 1/B, 1/N
    B,
    NCHUNK,
    HEAD: tl.constexpr,  # the loss's head: a @triton.jit function from its module's triton_heads()
    HAS_STD: tl.constexpr,
    S: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Phase 2 of every loss, one program: sum the chunk partials, run the loss's HEAD in fp64
    (which writes the metrics) and write the loss and the dL/d(input) coefficients it returns
    (gradient in forward). The backward is then one elementwise kernel: grad = g * coef[b] * (a - b).

    HEAD(s0, s1, s2, s3, std, beta, p1, p2, inv_b, inv_n, rmask, met_ptr) -> (per-sample loss,
    coef_w, coef_l), all [BLOCK_B] fp64; s0..s3 are the per-sample sums (s2, s3 zero when S == 2).
    """
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    s0 = tl.zeros([BLOCK_B], dtype=tl.float64)
    s1 = tl.zeros([BLOCK_B], dtype=tl.float64)
    s2 = tl.zeros([BLOCK_B], dtype=tl.float64)
    s3 = tl.zeros([BLOCK_B], dtype=tl.float64)
    for c0 in range(0, NCHUNK, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m2 = rmask[:, None] & (cols[None, :] < NCHUNK)
        base = (rows[:, None] * NCHUNK + cols[None, :]) * S
        s0 += tl.sum(tl.load(part_ptr + base, mask=m2, other=0.0).to(tl.float64), axis=1)
        s1 += tl.sum(tl.load(part_ptr + base + 1, mask=m2, other=0.0).to(tl.float64), axis=1)
        if S == 4:
            s2 += tl.sum(tl.load(part_ptr + base + 2, mask=m2, other=0.0).to(tl.float64), axis=1)
            s3 += tl.sum(tl.load(part_ptr + base + 3, mask=m2, other=0.0).to(tl.float64), axis=1)
    if HAS_STD:
        std = tl.load(std_ptr + rows, mask=rmask, other=1.0).to(tl.float64)
    else:
        std = tl.zeros([BLOCK_B], dtype=tl.float64) + 1.0
    # Scalars come from an fp64 buffer: float kernel arguments would be fp32, and 1-valued ints
    # are specialised to constants by Triton.
    beta = tl.load(param_ptr)
    p1 = tl.load(param_ptr + 1)
    p2 = tl.load(param_ptr + 2)
    inv_b = tl.load(param_ptr + 3)
    inv_n = tl.load(param_ptr + 4)
    per_sample, coef_w, coef_l = HEAD(s0, s1, s2, s3, std, beta, p1, p2, inv_b, inv_n, rmask, met_ptr)
    tl.store(coef_ptr + rows, coef_w.to(coef_ptr.dtype.element_ty), mask=rmask)
    tl.store(coef_ptr + B + rows, coef_l.to(coef_ptr.dtype.element_ty), mask=rmask)
    loss = tl.sum(tl.where(rmask, per_sample, 0.0), axis=0) * inv_b
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
