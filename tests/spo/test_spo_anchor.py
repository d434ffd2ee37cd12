"""SPO's early-step anchor (method.anchor_weight): the KL of one DDIM step at a timestep SPO never
trains, checked against diffusers' DDIMScheduler and torch.distributions, and its place in the
objective's loss (added with its weight, off by default without touching the engine's stream)."""

import copy
import types

import pytest
import torch
from diffusers import DDIMScheduler

from spoxl import sampling
from spoxl.errors import SpoxlError
from spoxl.methods.spo import SPOObjective, anchor_kl
from spoxl.models.text import encode_prompts, make_time_ids
from pool_inputs import lora_policy, reference_of, sample_round_pairs
from spo_threads import one_thread  # noqa: F401  (autouse fixture)

PROMPTS = ["a red circle", "a green square"]
STEPS, DIVERT, ETA, CFG = 6, 3, 0.7, 5.0  # eta below 1: the std must carry it


class RecordingUNet(torch.nn.Module):
    """Passes through, recording the timesteps of each call."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.timesteps = []

    def forward(self, x, t, *args, **kwargs):
        self.timesteps.append(torch.as_tensor(t).flatten().clone())
        return self.unet(x, t, *args, **kwargs)


@pytest.fixture(scope="module")
def lora_unet(tiny_components):
    return lora_policy(tiny_components.unet)


@pytest.fixture(scope="module")
def pairs(tiny_components):
    # one 3-step segment with inner steps: pairs whose loser starts elsewhere (the anchor takes the winner's)
    pairs = sample_round_pairs(tiny_components, PROMPTS, steps=STEPS, divert_start_step=DIVERT, num_inner_step=1)
    assert len(pairs) >= 4 and (~pairs.shared).any()
    return pairs


def model_kw(comps):
    return dict(cfg_scale=CFG, uncond=encode_prompts(comps, [""]), time_ids=make_time_ids(1, (64, 64)))


def anchor(unet, comps, pairs, seed, **over):
    args = dict(scheduler=comps.scheduler, steps=STEPS, divert_start_step=DIVERT, eta=ETA,
                generator=torch.Generator().manual_seed(seed), **model_kw(comps))  # fmt: skip
    args.update(over)
    return anchor_kl(unet, reference_of(unet), pairs, **args)


def test_anchor_kl_is_the_early_step_kl_computed_with_diffusers(tiny_components, lora_unet, pairs):
    comps = tiny_components
    with torch.no_grad():
        kl = anchor(lora_unet, comps, pairs, seed=7)

    # By hand, drawing what the anchor draws from the same generator (t' index, then z)
    gen = torch.Generator().manual_seed(7)
    sched = DDIMScheduler.from_config(comps.scheduler.config)
    sched.set_timesteps(STEPS)
    early = sched.timesteps[:DIVERT]
    t_up = early[torch.randint(0, DIVERT, (len(pairs),), generator=gen)]
    z = torch.randn(pairs.x_t_w.shape, generator=gen)
    ac = sched.alphas_cumprod
    kw = model_kw(comps)
    expected = []
    for i in range(len(pairs)):
        t, tu = int(pairs.timestep[i]), int(t_up[i])
        assert tu > t  # the anchor goes UP from the pair's step, to a step SPO never trains
        # the forward process from t to t': mean sqrt(ac[t'] / ac[t]) x_t, variance 1 - ac[t'] / ac[t]
        x_up = (ac[tu] / ac[t]).sqrt() * pairs.x_t_w[i : i + 1] + (1 - ac[tu] / ac[t]).sqrt() * z[i : i + 1]
        means = []
        for use_lora in (True, False):
            (lora_unet.enable_adapters if use_lora else lora_unet.disable_adapters)()
            with torch.no_grad():
                eps = sampling.guided_output(lora_unet, x_up, torch.tensor([tu]), pairs.cond.index([i]),
                                             kw["uncond"], kw["time_ids"], CFG)  # fmt: skip
            # diffusers' DDIM step with zero variance noise is the step's mean
            means.append(sched.step(eps, tu, x_up, eta=ETA, variance_noise=torch.zeros_like(x_up)).prev_sample)
        lora_unet.enable_adapters()
        variance = sched._get_variance(tu, tu - 1000 // STEPS)  # noqa: SLF001 (diffusers' own std)
        std = ETA * variance.sqrt()
        p, q = torch.distributions.Normal(means[0], std), torch.distributions.Normal(means[1], std)
        expected.append(torch.distributions.kl_divergence(p, q).mean())
    expected = torch.stack(expected)
    assert (expected > 0).all()
    torch.testing.assert_close(kl, expected, rtol=2e-4, atol=1e-9)


def test_anchor_draws_every_early_timestep_and_only_those(tiny_components, lora_unet, pairs):
    recorder = RecordingUNet(lora_unet)
    early = set(int(t) for t in sampling.inference_timesteps(tiny_components.scheduler, STEPS)[:DIVERT])
    seen = set()
    with torch.no_grad():
        for seed in range(6):
            recorder.timesteps.clear()
            anchor_kl(recorder, reference_of(lora_unet), pairs, scheduler=tiny_components.scheduler, steps=STEPS,
                      divert_start_step=DIVERT, eta=ETA, generator=torch.Generator().manual_seed(seed),
                      **model_kw(tiny_components))  # fmt: skip
            assert len(recorder.timesteps) == 1  # the policy once; the reference is the plain module
            seen |= set(int(t) for t in torch.cat(recorder.timesteps))
    assert seen == early


def test_anchor_is_zero_at_the_reference_and_its_gradient_pulls_the_policy_back(tiny_components, lora_unet, pairs):
    unet = copy.deepcopy(lora_unet)
    lora = [p for n, p in unet.named_parameters() if "lora_" in n]
    with torch.no_grad():
        start = float(anchor(unet, tiny_components, pairs, seed=3).mean())
    opt = torch.optim.Adam(lora, lr=1e-2)
    for _ in range(8):
        opt.zero_grad()
        anchor(unet, tiny_components, pairs, seed=3).mean().backward()
        assert all(p.grad is not None for p in lora)
        opt.step()
    with torch.no_grad():
        after = float(anchor(unet, tiny_components, pairs, seed=3).mean())
    assert after < 0.5 * start, (start, after)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.zero_()
        assert float(anchor(unet, tiny_components, pairs, seed=3).abs().max()) == 0.0


def test_anchor_refuses_a_run_that_branches_from_the_first_step(tiny_components, lora_unet, pairs):
    with pytest.raises(SpoxlError, match="needs steps before method.divert_start_step"):
        anchor(lora_unet, tiny_components, pairs, seed=0, divert_start_step=0)


# ---- in the objective --------------------------------------------------------------------------


def objective_and_run(comps, unet, weight: float, tmp_path, *overrides):
    from spoxl.config import load_config

    cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", f"method.anchor_weight={weight}",
                                                f"method.steps={STEPS}", f"method.divert_start_step={DIVERT}",
                                                f"method.cfg_scale={CFG}", f"method.eta={ETA}", *overrides])  # fmt: skip
    objective = SPOObjective.from_recipe(cfg)
    objective.check(cfg)
    objective.uncond = encode_prompts(comps, [""])
    objective.time_ids = make_time_ids(1, (64, 64))
    run = types.SimpleNamespace(policy=unet, reference=reference_of(unet), components=comps, prediction_type="epsilon",
                                device=torch.device("cpu"), dtype=torch.float32,
                                generator=torch.Generator().manual_seed(11))  # fmt: skip
    return objective, run


def test_the_objective_adds_the_weighted_anchor_and_leaves_the_default_untouched(tiny_components, lora_unet, pairs,
                                                                                  tmp_path):  # fmt: skip
    losses = {}
    for weight in (0.0, 2.5):
        objective, run = objective_and_run(tiny_components, lora_unet, weight, tmp_path)
        state = run.generator.get_state()
        with torch.no_grad():
            losses[weight], metrics = objective.loss(run, pairs)
        if weight == 0:
            # off: no anchor metric and the engine's stream untouched (default runs draw what they drew)
            assert "anchor_kl" not in metrics
            assert torch.equal(run.generator.get_state(), state)
        else:
            with torch.no_grad():
                kl = anchor_kl(lora_unet, reference_of(lora_unet), pairs, scheduler=tiny_components.scheduler,
                               steps=STEPS, divert_start_step=DIVERT, eta=ETA,
                               generator=torch.Generator().manual_seed(11), **model_kw(tiny_components)).mean()  # fmt: skip
            assert float(kl) > 0
            torch.testing.assert_close(metrics["anchor_kl"], kl)
    torch.testing.assert_close(losses[2.5], losses[0.0] + 2.5 * kl, rtol=1e-6, atol=1e-7)


def test_anchor_pairs_anchors_the_first_pairs_of_the_micro_batch_only(tiny_components, lora_unet, pairs, tmp_path):
    assert len(pairs) >= 2
    objective, run = objective_and_run(tiny_components, lora_unet, 2.5, tmp_path, "method.anchor_pairs=1")
    with torch.no_grad():
        loss, metrics = objective.loss(run, pairs)
        base, _ = objective_and_run(tiny_components, lora_unet, 0.0, tmp_path)[0].loss(run, pairs)
        first = anchor_kl(lora_unet, reference_of(lora_unet), pairs.index(slice(0, 1)), scheduler=tiny_components.scheduler,
                          steps=STEPS, divert_start_step=DIVERT, eta=ETA, generator=torch.Generator().manual_seed(11),
                          **model_kw(tiny_components)).mean()  # fmt: skip
    torch.testing.assert_close(metrics["anchor_kl"], first)
    torch.testing.assert_close(loss, base + 2.5 * first, rtol=1e-6, atol=1e-7)
    # a count past the micro-batch is the whole micro-batch
    objective, run = objective_and_run(tiny_components, lora_unet, 2.5, tmp_path, f"method.anchor_pairs={len(pairs) + 5}")
    with torch.no_grad():
        every = anchor_kl(lora_unet, reference_of(lora_unet), pairs, scheduler=tiny_components.scheduler, steps=STEPS,
                          divert_start_step=DIVERT, eta=ETA, generator=torch.Generator().manual_seed(11),
                          **model_kw(tiny_components)).mean()  # fmt: skip
        torch.testing.assert_close(objective.loss(run, pairs)[1]["anchor_kl"], every)
    assert not torch.allclose(first, every)


@pytest.mark.parametrize("value, message", [("0", "positive integer"), ("-2", "positive integer"),
                                            ("1.5", "positive integer"), ("true", "positive integer")])
def test_bad_anchor_pairs_are_refused_before_launch(tmp_path, value, message):
    from spoxl.config import load_config

    try:
        cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", "method.anchor_weight=1",
                                                    f"method.anchor_pairs={value}"])  # fmt: skip
    except SpoxlError as e:  # the loader's own type check may answer first
        assert "anchor_pairs" in str(e)
        return
    with pytest.raises(SpoxlError, match=f"anchor_pairs must be a {message}"):
        SPOObjective.from_recipe(cfg).check(cfg)


def test_anchor_pairs_without_an_anchor_is_refused(tmp_path):
    from spoxl.config import load_config

    cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", "method.anchor_pairs=4"])
    with pytest.raises(SpoxlError, match="the anchor is off"):
        SPOObjective.from_recipe(cfg).check(cfg)


def test_bad_anchor_weights_are_refused_before_launch(tmp_path):
    from spoxl.config import load_config

    cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", "method.anchor_weight=-1"])
    with pytest.raises(SpoxlError, match="anchor_weight must be >= 0"):
        SPOObjective.from_recipe(cfg).check(cfg)
    with pytest.raises(SpoxlError, match="anchor_weight must be a finite number"):
        load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", "method.anchor_weight=.nan"])


def test_an_anchor_without_early_steps_is_refused_before_launch(tmp_path):
    from spoxl.config import load_config

    cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", "method.anchor_weight=1",
                                                "method.divert_start_step=0"])  # fmt: skip
    with pytest.raises(SpoxlError, match="divert_start_step is 0"):
        SPOObjective.from_recipe(cfg).check(cfg)


def test_preflight_counts_the_anchor_s_policy_rows(tmp_path):
    # the anchor's policy forward is alive with the pair loss's until backward: spoxl preflight sizes by it
    from spoxl.config import load_config

    def rows(*overrides):
        cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", "method.num_inner_step=0",
                                                    "method.cfg_scale=5.0", *overrides])  # fmt: skip
        return SPOObjective.micro_step_unet_batch(cfg)[0]

    assert rows() == 2 and rows("method.anchor_weight=1") == 4
    # a subset of the micro-batch's 4 pairs: 2 rows each for the loss, 2 for each of 1 anchored pair in 4
    assert rows("method.anchor_weight=1", "method.anchor_pairs=1") == 2.5
    assert rows("method.anchor_weight=1", "method.anchor_pairs=9") == 4
