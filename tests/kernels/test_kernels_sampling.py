"""pool_step, transition_logprob and pool_logprobs on both backends.

pool_step is checked against diffusers' own DDIMScheduler.step (an oracle outside spoxl) with the
same injected noise, on SDXL's schedule; its Philox/Generator noise statistically and for seed
reproducibility. The log-probs against the written-out Gaussian density, values and gradients.
"""

import pytest
import torch
from diffusers import DDIMScheduler

import spoxl.kernels as K
from kernel_oracles import assert_close, gaussian_logprob, leaf
from kernel_oracles import backend  # noqa: F401 (fixture)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 4, 8, 8), (3, 3, 5, 7)]


def sdxl_scheduler() -> DDIMScheduler:
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip
    scheduler.set_timesteps(20)
    return scheduler


@pytest.mark.parametrize("t", [951, 501, 51])
@pytest.mark.parametrize("dtype,shape", [(d, s) for d in DTYPES for s in SHAPES])
def test_pool_step_matches_diffusers_ddim_step(backend, dtype, shape, t):
    scheduler = sdxl_scheduler()
    k = 3
    x_t = torch.randn(shape).to(dtype)
    eps = torch.randn(shape).to(dtype)
    noise = torch.randn(shape[0], k, *shape[1:])
    a = scheduler.alphas_cumprod[t]
    a_prev = scheduler.alphas_cumprod[t - 50]
    samples, mean, std = K.pool_step(x_t, eps, a, a_prev, 1.0, k, noise=noise)
    assert samples.shape == (shape[0], k, *shape[1:]) and samples.dtype == dtype
    assert mean.shape == shape and mean.dtype == torch.float32 and std.shape == (shape[0],)
    expected_std = (1.0 * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()).float()
    torch.testing.assert_close(std, expected_std.expand(shape[0]), rtol=1e-6, atol=0)
    for j in range(k):
        expected = scheduler.step(
            eps.double(), t, x_t.double(), eta=1.0, variance_noise=noise[:, j].double()
        ).prev_sample
        assert_close(samples[:, j], expected, dtype, name=f"candidate {j}")
    # The mean is what every candidate is centred on: eta = 0 gives it back exactly.
    mean0, _, std0 = K.pool_step(x_t, eps, a, a_prev, 0.0, 1, noise=noise[:, :1])
    assert torch.all(std0 == 0)
    expected_mean = scheduler.step(eps.double(), t, x_t.double(), eta=0.0).prev_sample
    assert_close(mean0[:, 0], expected_mean, dtype, name="deterministic step")


def test_pool_step_per_sample_schedule(backend):
    """alpha_bar / eta given per sample ([B] tensors) equal one call per sample with floats."""
    shape = (3, 4, 6, 6)
    x_t, eps = torch.randn(shape), torch.randn(shape)
    noise = torch.randn(3, 2, *shape[1:])
    a, a_prev, eta = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.6, 0.95]), torch.tensor([1.0, 0.5, 1.0])
    samples, mean, std = K.pool_step(x_t, eps, a, a_prev, eta, 2, noise=noise)
    for b in range(3):
        s_b, m_b, std_b = K.pool_step(
            x_t[b : b + 1], eps[b : b + 1], float(a[b]), float(a_prev[b]), float(eta[b]), 2, noise=noise[b : b + 1]
        )
        torch.testing.assert_close(samples[b : b + 1], s_b)
        torch.testing.assert_close(mean[b : b + 1], m_b)
        torch.testing.assert_close(std[b : b + 1], std_b)


def test_pool_step_noise_statistics(backend):
    """(samples - mean) / std is standard normal: mean ~ 0, std ~ 1, and candidates independent."""
    shape = (2, 4, 32, 32)  # 2 * 4 * 4096 = 32768 draws
    k = 4
    x_t, eps = torch.randn(shape), torch.randn(shape)
    samples, mean, std = K.pool_step(x_t, eps, 0.3, 0.4, 1.0, k, seed=1234)
    z = (samples.double() - mean.double().unsqueeze(1)) / std.double().view(-1, 1, 1, 1, 1)
    n = z.numel()
    assert abs(float(z.mean())) < 4 / n**0.5
    assert abs(float(z.std()) - 1) < 0.02
    assert abs(float((z**4).mean()) - 3) < 0.15  # Gaussian kurtosis, not e.g. uniform
    # Different candidates of the same element are uncorrelated (distinct Philox offsets / draws).
    flat = z.transpose(0, 1).reshape(k, -1)
    corr = torch.corrcoef(flat)
    assert float((corr - torch.eye(k, dtype=corr.dtype)).abs().max()) < 0.05


def test_pool_step_seed_reproducibility(backend):
    shape = (2, 3, 5, 7)
    x_t, eps = torch.randn(shape), torch.randn(shape)
    first = K.pool_step(x_t, eps, 0.3, 0.4, 1.0, 2, seed=7)[0]
    again = K.pool_step(x_t, eps, 0.3, 0.4, 1.0, 2, seed=7)[0]
    other = K.pool_step(x_t, eps, 0.3, 0.4, 1.0, 2, seed=8)[0]
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert not torch.allclose(first[:, 0], first[:, 1]), "candidates must get different noise"


@pytest.mark.parametrize("std_kind", ["float", "tensor"])
@pytest.mark.parametrize("dtype,shape", [(d, s) for d in DTYPES for s in SHAPES] + [(torch.float32, (2, 4, 24, 24))])
def test_transition_logprob(backend, dtype, shape, std_kind):
    x = torch.randn(shape).to(dtype)
    mean = (x.float() + 0.5 * torch.randn(shape)).to(dtype).requires_grad_(True)
    std = 0.7 if std_kind == "float" else torch.linspace(0.4, 0.9, shape[0])
    logp = K.transition_logprob(x, mean, std)
    assert logp.shape == (shape[0],) and logp.dtype == torch.float32
    mean_ref = leaf(mean)
    std_ref = torch.as_tensor(std, dtype=torch.float64).expand(shape[0])
    expected = gaussian_logprob(leaf(x), mean_ref, std_ref)
    assert_close(logp, expected, torch.float32, name="logp")
    weights = torch.randn(shape[0])
    (logp * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    assert mean.grad.dtype == dtype
    assert_close(mean.grad, mean_ref.grad, dtype, name="grad mean")


@pytest.mark.parametrize("dtype,shape", [(d, s) for d in DTYPES for s in SHAPES])
def test_pool_logprobs(backend, dtype, shape):
    k = 3
    std = torch.linspace(0.4, 0.9, shape[0])
    mean = torch.randn(shape)
    samples = (mean.unsqueeze(1) + std.view(-1, 1, 1, 1, 1) * torch.randn(shape[0], k, *shape[1:])).to(dtype)
    mean = mean.to(dtype).requires_grad_(True)
    ref_mean = (mean.detach().float() + 0.1 * torch.randn(shape)).to(dtype).requires_grad_(True)
    logp, ref_logp = K.pool_logprobs(samples, mean, ref_mean, std)
    assert logp.shape == ref_logp.shape == (shape[0], k)
    m, r, s = leaf(mean), leaf(ref_mean), leaf(samples)
    exp_logp = torch.stack([gaussian_logprob(s[:, j], m, std.double()) for j in range(k)], 1)
    exp_ref = torch.stack([gaussian_logprob(s[:, j], r, std.double()) for j in range(k)], 1)
    assert_close(logp, exp_logp, torch.float32, name="logp")
    assert_close(ref_logp, exp_ref, torch.float32, name="ref_logp")
    w1, w2 = torch.randn(shape[0], k), torch.randn(shape[0], k)
    ((logp * w1).sum() + (ref_logp * w2).sum()).backward()
    ((exp_logp * w1.double()).sum() + (exp_ref * w2.double()).sum()).backward()
    assert_close(mean.grad, m.grad, dtype, name="grad mean")
    assert_close(ref_mean.grad, r.grad, dtype, name="grad ref_mean")


def test_pool_logprobs_agree_with_transition_logprob(backend):
    shape = (2, 4, 8, 8)
    samples, mean, std = K.pool_step(torch.randn(shape), torch.randn(shape), 0.3, 0.4, 1.0, 4, seed=3)
    logp, ref_logp = K.pool_logprobs(samples, mean, mean, std)
    torch.testing.assert_close(logp, ref_logp)
    for j in range(4):
        torch.testing.assert_close(logp[:, j], K.transition_logprob(samples[:, j], mean, std), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alphas", ["floats", "host_tensors", "per_sample"])
def test_pool_step_logprobs_equal_transition_logprob(backend, dtype, alphas):
    """return_logprob=True gives each STORED candidate's transition_logprob under the shared mean,
    from the step itself, for every way the timestep can be given (host scalars go to the kernel
    as arguments; per-sample values as tensors), with drawn and with injected noise."""
    scheduler = sdxl_scheduler()
    shape, k = (3, 4, 6, 10), 4
    x_t, eps = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    a, a_prev = scheduler.alphas_cumprod[501], scheduler.alphas_cumprod[451]
    if alphas == "floats":
        a, a_prev = float(a), float(a_prev)
    elif alphas == "per_sample":
        a, a_prev = a.repeat(shape[0]), a_prev.repeat(shape[0])
    for noise in (None, torch.randn(shape[0], k, *shape[1:])):
        samples, mean, std, logp = K.pool_step(x_t, eps, a, a_prev, 1.0, k, seed=2**62 - 3, noise=noise,
                                               return_logprob=True)  # fmt: skip
        plain = K.pool_step(x_t, eps, a, a_prev, 1.0, k, seed=2**62 - 3, noise=noise)
        assert all(torch.equal(u, v) for u, v in zip((samples, mean, std), plain))  # the same step
        assert logp.shape == (shape[0], k)
        for j in range(k):
            expected = K.transition_logprob(samples[:, j], mean, std)
            assert_close(logp[:, j], expected, torch.float32, name=f"logp of candidate {j}")
        # and the density is the written-out Gaussian one of the stored samples
        assert_close(logp[:, 0], gaussian_logprob(samples[:, 0], mean, std), torch.float32, name="logp oracle")
