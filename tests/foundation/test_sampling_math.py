"""spoxl.sampling against diffusers' schedulers: the math must be theirs, not a re-derivation."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from spoxl import sampling as S
from spoxl.models.tiny import sdxl_scheduler

STEPS = 20


def _scheduler(prediction_type="epsilon"):
    sched = sdxl_scheduler()
    if prediction_type != "epsilon":
        sched = DDIMScheduler.from_config(sched.config, prediction_type=prediction_type)
    return sched


def test_inference_timesteps_are_sdxl_leading_grid():
    ts = S.inference_timesteps(_scheduler(), STEPS)
    assert ts.tolist() == list(range(951, 0, -50))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("t", [951, 501, 1])
def test_ddim_step_equals_diffusers(prediction_type, eta, t):
    sched = _scheduler(prediction_type)
    sched.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(t)
    x_t = torch.randn(2, 4, 8, 8, generator=g)
    output = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    expected = sched.step(output, t, x_t, eta=eta, variance_noise=noise).prev_sample

    a = S.alpha_bar(sched, t)
    a_prev = S.alpha_bar(sched, S.prev_timestep(sched, t, STEPS))
    x_prev, mean, std, x0 = S.ddim_step(output, x_t, a, a_prev, eta, noise, prediction_type)
    torch.testing.assert_close(x_prev, expected, rtol=1e-5, atol=1e-5)
    if eta == 0:
        torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-5)


def test_last_step_uses_final_alpha_cumprod():
    sched = _scheduler()
    # t=1 -> prev -49: diffusers uses final_alpha_cumprod (alphas_cumprod[0] for SDXL).
    assert S.alpha_bar(sched, -49).item() == pytest.approx(float(sched.final_alpha_cumprod))


@pytest.mark.parametrize("t", [951, 501, 51])
def test_ddim_eta1_variance_is_ddpm_posterior_variance(t):
    sched = _scheduler()
    t_prev = S.prev_timestep(sched, t, STEPS)
    a, a_prev = S.alpha_bar(sched, t), S.alpha_bar(sched, t_prev)
    std = S.ddim_std(a, a_prev, eta=1.0)

    # DDPM posterior (fixed_small) for the same pair of timesteps, as diffusers computes it.
    ddpm = DDPMScheduler.from_config(sched.config, variance_type="fixed_small")
    ddpm.set_timesteps(STEPS)
    assert int(ddpm.previous_timestep(t)) == t_prev
    ddpm_var = ddpm._get_variance(t)
    torch.testing.assert_close(std**2, torch.as_tensor(ddpm_var, dtype=torch.float32), rtol=1e-5, atol=1e-9)

    # And our posterior helper agrees with both, including the mean at eta=1.
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    x0, eps_hat = S.split_prediction(eps, x_t, a)
    post_mean, post_var = S.ddpm_posterior(x_t, x0, a, a_prev)
    torch.testing.assert_close(post_var, std**2, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(post_mean, S.ddim_mean(x0, eps_hat, a_prev, std), rtol=1e-4, atol=1e-5)


def test_add_noise_matches_diffusers():
    sched = _scheduler()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999])
    expected = sched.add_noise(x0, noise, t)
    torch.testing.assert_close(S.add_noise(x0, noise, S.alpha_bar(sched, t)), expected, rtol=1e-5, atol=1e-5)


def test_v_prediction_target_roundtrip():
    sched = _scheduler()
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 800])
    a = S.alpha_bar(sched, t)
    x_t = S.add_noise(x0, noise, a)
    v = S.training_target(x0, noise, a, "v_prediction")
    torch.testing.assert_close(v, sched.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)
    x0_hat, eps_hat = S.split_prediction(v, x_t, a, "v_prediction")
    torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-4, atol=1e-4)


def test_transition_logprob_is_mean_gaussian_log_density():
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(2, 4, 3, 5, generator=g, requires_grad=True)
    x = torch.randn(2, 4, 3, 5, generator=g)
    std = torch.tensor([0.3, 0.7])
    lp = S.transition_logprob(x, mean, std)
    ref = torch.distributions.Normal(mean, std.view(2, 1, 1, 1)).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(lp, ref)
    # Gradient goes to the mean: d/dmu = (x - mu) / (std^2 N).
    lp.sum().backward()
    n = 4 * 3 * 5
    torch.testing.assert_close(mean.grad, (x - mean.detach()) / (std.view(2, 1, 1, 1) ** 2 * n))
    assert -math.log(math.sqrt(2 * math.pi)) == pytest.approx(-S.LOG_SQRT_2PI)


def test_cfg_combine():
    u, c = torch.zeros(3), torch.ones(3)
    torch.testing.assert_close(S.cfg_combine(u, c, 5.0), torch.full((3,), 5.0))


def test_decode_chunk_caps_a_vae_call_by_images_and_by_pixels():
    # 16 small images, 4 SDXL-size ones (12 GiB of fp32 activations), never fewer than one
    assert S.DECODE_CHUNK == 16 and S.DECODE_PIXELS == 4 * 1024 * 1024
    assert S.decode_chunk(64, 64) == 16 and S.decode_chunk(512, 512) == 16
    assert S.decode_chunk(1024, 1024) == 4 and S.decode_chunk(768, 1024) == 5
    assert S.decode_chunk(2048, 2048) == 1 and S.decode_chunk(4096, 4096) == 1


def test_decode_latents_sizes_its_calls_by_the_images_pixels(tiny_components, monkeypatch):
    """The default chunk comes from the decoded size (latent size x the VAE's factor 8): with the
    pixel cap at 3 images of 64 px, 8 x 8 latents go 3 at a time, 4 x 4 (32 px) latents 12."""
    vae = tiny_components.vae
    monkeypatch.setattr(S, "DECODE_PIXELS", 3 * 64 * 64)
    seen = []
    original = vae.decode
    monkeypatch.setattr(vae, "decode", lambda z, **kw: (seen.append(z.shape[0]), original(z, **kw))[1])
    with torch.no_grad():
        S.decode_latents(vae, torch.zeros(7, 4, 8, 8))
        S.decode_latents(vae, torch.zeros(13, 4, 4, 4))
    assert seen == [3, 3, 1, 12, 1]


def test_decode_latents_goes_chunk_latents_at_a_time_and_gives_the_one_call_images(tiny_components):
    """The VAE sees at most `chunk` latents per call (DECODE_CHUNK, 16, by default), and the images
    are the single call's (a dropped or repeated slice, or a missing scaling, would change them)."""
    vae = tiny_components.vae
    latents = torch.randn((7, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0].float().clamp(-1, 1)
        seen = []
        original = vae.decode
        vae.decode = lambda z, **kw: (seen.append(z.shape[0]), original(z, **kw))[1]
        try:
            chunked = S.decode_latents(vae, latents, chunk=3)
            default = S.decode_latents(vae, latents.repeat(3, 1, 1, 1))
        finally:
            del vae.decode
    assert S.DECODE_CHUNK == 16 and seen == [3, 3, 1, 16, 5]
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(default, whole.repeat(3, 1, 1, 1), rtol=1e-5, atol=1e-5)
