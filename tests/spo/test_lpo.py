"""LPO's sampler mode and dynamic threshold (lpo.md 3), its recipes, and its LRM trainer's pieces.

The sampler in LPO mode (score_candidates): pools at every step from the first, the candidates
x_{t-1} themselves scored at the CURRENT t, never a VAE call, and only the continued candidate
through the UNet. The dynamic threshold against the official sigma table (20 steps) and against
the formula computed here from alphas_cumprod (50 steps)."""

import math

import pytest
import torch

from spoxl import sampling
from spoxl.config import load_config
from spoxl.errors import SpoxlError
from spoxl.spo.pool_sampler import PoolSampler, PoolSamplerConfig, pair_gap, step_thresholds
from pool_inputs import PROMPTS, CountingUNet, setup  # noqa: F401  (setup: a fixture)
from spo_threads import one_thread  # noqa: F401  (autouse fixture)

# The official code's hard-coded DDIM(eta=1) sigma of SDXL's 20-step grid, indexed t // 50
# (Kwai-Kolors/LPO lpo/lpo/preference_models/compare_funcs.py).
OFFICIAL_SIGMA_20 = [0.0206, 0.0406, 0.1673, 0.2144, 0.2509, 0.2836, 0.3144, 0.3442, 0.3732, 0.4016, 0.4293, 0.4565,
                     0.4829, 0.5087, 0.5336, 0.5576, 0.5807, 0.6029, 0.6241, 0.6444]  # fmt: skip


class NoVAE:
    """A VAE that fails the test if anything decodes or encodes with it."""

    def __getattr__(self, name):
        raise AssertionError(f"the LPO sampler touched the VAE ({name})")


class LatentScorer:
    """A latent preference model whose scores the test decides; records (timesteps, inputs)."""

    input = "latents"

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def score(self, x, prompts, timesteps):
        self.calls.append((torch.as_tensor(timesteps).flatten().tolist(), x.clone()))
        return self.fn(x)


def lpo_run(setup, scorer, **cfg):
    comps, cond, uncond, time_ids, latents = setup
    config = PoolSamplerConfig(**{"steps": 6, "divert_start_step": 0, "pool_size": 4, "num_inner_step": 0,
                                  "threshold": 0.3, "score_candidates": True, "cfg_scale": 5.0, **cfg})  # fmt: skip
    sampler = PoolSampler(config, comps.scheduler, NoVAE(), scorer)
    unet = CountingUNet(comps.unet)
    return sampler.sample(unet, PROMPTS, cond, uncond, time_ids, latents, torch.Generator().manual_seed(0)), unet


def test_lpo_mode_scores_the_candidates_at_the_current_t_and_never_calls_the_vae(setup):
    scorer = LatentScorer(lambda x: 1e3 * x.flatten(1).mean(1))  # every pair passes
    result, unet = lpo_run(setup, scorer)
    grid = [int(t) for t in sampling.inference_timesteps(setup[0].scheduler, 6)]
    # a pool at EVERY step, scored at that step's own t (not the next one, not 0 at the end)
    assert [c[0] for c in scorer.calls] == [[t] for t in grid]
    assert sorted(result.offered, reverse=True) == grid
    # what was scored are the candidates themselves: the kept winners are among them, as scored
    pairs = result.pairs
    assert len(pairs) == 3 * 6 and pairs.shared.all()
    for step, (_, x) in enumerate(scorer.calls):
        s = 1e3 * x.flatten(1).mean(1)
        best = x.view(3, 4, *x.shape[1:])[torch.arange(3), s.view(3, 4).argmax(1)]
        rows = pairs.timestep == grid[step]
        torch.testing.assert_close(pairs.x_w[rows], best, rtol=0, atol=0)
    # the UNet sees the continued candidate only: prompts x CFG, never prompts x k
    assert unet.batches == [2 * 3] * 6 == [2 * 3] * result.unet_calls


def test_lpo_mode_refuses_an_image_scorer_and_chunked_segments(setup):
    from spoxl.models.scorers import ColourScorer

    comps = setup[0]
    with pytest.raises(SpoxlError, match="takes images"):
        PoolSampler(PoolSamplerConfig(score_candidates=True, num_inner_step=0), comps.scheduler, comps.vae, ColourScorer())
    with pytest.raises(SpoxlError, match="num_inner_step must be 0"):
        PoolSamplerConfig(score_candidates=True, num_inner_step=3).validate()
    with pytest.raises(SpoxlError, match="threshold_max"):
        PoolSamplerConfig(threshold=0.5, threshold_max=0.4).validate()


def test_dynamic_threshold_matches_the_official_sigma_table_at_20_steps(setup):
    from spoxl.models.tiny import sdxl_scheduler

    got = step_thresholds(sdxl_scheduler(), 20, 0.45, 0.6)
    lo, hi = OFFICIAL_SIGMA_20[0], OFFICIAL_SIGMA_20[-1]
    want = {50 * i + 1: 0.45 + 0.15 * (s - lo) / (hi - lo) for i, s in enumerate(OFFICIAL_SIGMA_20)}
    assert sorted(got) == sorted(want)
    for t in want:  # the table is printed to 4 decimals: 1e-4 in sigma is < 3e-5 in the threshold
        assert abs(got[t] - want[t]) < 3e-4, (t, got[t], want[t])
    assert got[951] == pytest.approx(0.6) and got[1] == pytest.approx(0.45)  # the noisiest step is the strictest


def test_dynamic_threshold_follows_the_formula_for_50_steps():
    from spoxl.models.tiny import sdxl_scheduler

    sched = sdxl_scheduler()
    ac = sched.alphas_cumprod.double()
    final = float(ac[0])  # set_alpha_to_one=False: the step past t = 1 lands on alphas_cumprod[0]
    ts = [1 + 20 * i for i in range(50)]  # leading spacing, offset 1: 1, 21, ..., 981
    sigma = {}
    for t in ts:
        a, a_prev = float(ac[t]), float(ac[t - 20]) if t - 20 >= 0 else final
        sigma[t] = math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    lo, hi = min(sigma.values()), max(sigma.values())
    got = step_thresholds(sched, 50, 0.35, 0.5)
    assert sorted(got) == ts
    for t in ts:
        assert got[t] == pytest.approx(0.35 + 0.15 * (sigma[t] - lo) / (hi - lo), abs=1e-5)


def test_the_sampler_keeps_a_pair_exactly_when_it_beats_its_steps_threshold(setup):
    # a fixed softmax gap between the best and the worst candidate of every pool, between the
    # thresholds of the first and the last step: kept at the quiet steps only
    gap = 0.5
    delta = 2 * math.atanh(gap)  # tanh(delta / 2) = gap

    def fn(x):
        return torch.tensor([delta, 0.0, 0.0, 0.0]).repeat(x.shape[0] // 4)

    result, _ = lpo_run(setup, LatentScorer(fn), threshold=0.4, threshold_max=0.6)
    thresholds = step_thresholds(setup[0].scheduler, 6, 0.4, 0.6)
    assert any(th < gap for th in thresholds.values()) and any(th > gap for th in thresholds.values())
    for t, th in thresholds.items():
        assert result.accepted[t] == (3 if th < gap else 0), (t, th)
    assert float(pair_gap(torch.tensor(delta), torch.tensor(0.0))) == pytest.approx(gap)


def _recipe(name):
    return load_config(f"configs/{name}.yaml", [])


def test_lpo_sdxl_recipe_is_the_official_one():
    cfg = _recipe("lpo_sdxl")
    p = cfg.method.params
    assert cfg.method.name == "lpo"
    assert (p.pool_size, p.num_inner_step, p.divert_start_step, p.steps, p.eta, p.cfg_scale) == (4, 0, 0, 20, 1.0, 5.0)
    assert (p.threshold, p.threshold_max, p.beta, p.clip, p.score_candidates) == (0.45, 0.6, 500.0, 0.1, True)
    assert p.preference.kind == "lrm" and p.train_cfg
    assert (cfg.lora.enabled, cfg.lora.rank, cfg.lora.alpha) == (True, 64, 64)
    assert sorted(cfg.lora.target_modules) == sorted(["to_q", "to_k", "to_v", "to_out.0"])
    assert (cfg.train.lr, cfg.optim.weight_decay, cfg.train.grad_clip) == (1e-5, 1e-4, 1.0)
    assert cfg.deepspeed.precision == "fp16" and cfg.train.gradient_checkpointing
    assert (p.prompts_per_rank, cfg.train.micro_batch_size, cfg.train.grad_accum, p.epochs) == (4, 4, 1, 5)


def test_lpo_sd15_recipe_uses_the_sd15_thresholds():
    p = _recipe("lpo_sd15").method.params
    assert (p.threshold, p.threshold_max, p.beta, p.pool_size, p.divert_start_step) == (0.35, 0.5, 500.0, 4, 0)


def test_method_lpo_defaults_and_refusals(tmp_path):
    from spoxl.methods.lpo import LPOConfig

    d = LPOConfig()
    assert (d.pool_size, d.num_inner_step, d.divert_start_step, d.beta, d.clip) == (4, 0, 0, 500.0, 0.1)
    assert (d.threshold, d.threshold_max, d.score_candidates, d.preference.kind) == (0.45, 0.6, True, "lrm")
    from spoxl.methods.lpo import LPOObjective

    base = ["model.path=tiny", f"run.output_dir={tmp_path}"]
    for override, message in (("method.preference.kind=fidelity", "latent reward model"),
                              ("method.score_candidates=false", "use method spo"),
                              ("method.preference.path=null", "needs a path")):  # fmt: skip
        cfg = load_config("configs/toy_lpo.yaml", [*base, override])
        with pytest.raises(SpoxlError, match=message):
            LPOObjective.from_recipe(cfg).check(cfg)


def test_lrm_training_inputs_noise_each_image_independently_at_one_t(tiny_components):
    from spoxl.commands.train_preference_model import grid_timesteps, noisy_latents

    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gen = torch.Generator().manual_seed(1)
    z_w, z_l = noisy_latents(tiny_components, pixels, pixels.clone(), ["a", "b"], torch.tensor([501, 501]), generator=gen)
    assert z_w.shape == (2, 4, 8, 8) and not torch.allclose(z_w, z_l)  # same image, different noise
    # the clean latents are what both are noised from: at t = 1 they are nearly equal
    z_w1, z_l1 = noisy_latents(tiny_components, pixels, pixels.clone(), ["a", "b"], torch.tensor([1, 1]),
                               generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert (z_w1 - z_l1).abs().mean() < 0.2 * (z_w - z_l).abs().mean()
    assert grid_timesteps(tiny_components.scheduler).tolist() == [1 + 50 * i for i in range(20)]


def test_mpcf_filter_rule_by_strategy(tmp_path):
    from spoxl.data.score_filter import keeps, read_score_table

    decided = {"different_flag": 1, "aesthetic_gap": -0.3, "clipscore_gap": 0.01, "vqascore_gap": 0.02}
    assert not keeps(decided, 1) and keeps(decided, 2) and keeps(decided, 3)
    assert not keeps({**decided, "aesthetic_gap": -0.7}, 2) and keeps({**decided, "aesthetic_gap": -0.7}, 3)
    assert not keeps({**decided, "clipscore_gap": 0.0}, 2)  # strictly positive
    assert not keeps({**decided, "vqascore_gap": -0.01}, 3)
    tie = {"different_flag": 0, "aesthetic_gap": 0.1, "clipscore_gap": 0.02, "vqascore_gap": 0.05}
    assert keeps(tie, 2) and not keeps({**tie, "clipscore_gap": 0.05}, 2) and not keeps({**tie, "vqascore_gap": 0.08}, 1)
    bad = tmp_path / "scores.csv"
    bad.write_text("different_flag,aesthetic_gap,clipscore_gap\n1,0,0\n")
    with pytest.raises(SpoxlError, match="vqascore_gap"):
        read_score_table(bad)


def test_score_table_keeps_the_rows_its_rule_keeps_in_the_pair_files_order(tmp_path):
    from spoxl.data.pairs import PreferencePairDataset
    from spoxl.data.score_filter import ScoreFilteredPairs
    from spoxl.toy import world
    from spoxl.toy.pairs import counterfactual_pairs, write_parquet

    rows = counterfactual_pairs(world.train_scenes(), 5, seed=0)
    path = write_parquet(rows, tmp_path / "pairs.parquet")
    dataset = PreferencePairDataset(path, 64, drop_ties=False)
    table = tmp_path / "scores.csv"
    table.write_text("different_flag,aesthetic_gap,clipscore_gap,vqascore_gap\n"
                     "1,0.1,0.02,0.01\n"    # kept
                     "1,-0.6,0.02,0.01\n"   # aesthetic below strategy 2's floor
                     "1,0.1,-0.01,0.01\n"   # CLIP score disagrees
                     "0,0.1,0.01,0.01\n"    # a consistent tie: kept
                     "1,0.3,0.05,0.2\n")    # kept  # fmt: skip
    kept = ScoreFilteredPairs(dataset, table, strategy=2)
    assert len(kept) == 3
    assert [kept[i]["caption"] for i in range(3)] == [rows[i]["caption"] for i in (0, 3, 4)]
    assert kept.captions() == [rows[i]["caption"] for i in (0, 3, 4)]
    assert len(ScoreFilteredPairs(dataset, table, strategy=3)) == 4  # -0.6 passes strategy 3's floor of -1
    table.write_text("different_flag,aesthetic_gap,clipscore_gap,vqascore_gap\n1,0,0,0\n")
    with pytest.raises(SpoxlError, match="1 rows, the pair file 5"):
        ScoreFilteredPairs(dataset, table)


def test_lrm_training_learns_a_preference_that_holds_on_held_out_captions(tmp_path):
    """A short LRM training on counterfactual pairs of TRAINING captions raises pairwise accuracy on
    pairs of HELD-OUT captions at low noise; labels swapped, it lowers it (the sign path)."""
    from spoxl.commands.train_preference_model import train_lrm
    from spoxl.data.pairs import PreferencePairDataset
    from spoxl.models.loading import load_sdxl
    from spoxl.models.lrm import LatentRewardModel
    from spoxl.toy import world
    from spoxl.toy.pairs import counterfactual_pairs, write_parquet

    comps = load_sdxl("toy")
    train = counterfactual_pairs(world.train_scenes(), 256, seed=0)
    swapped = [{**r, "label_0": r["label_1"], "label_1": r["label_0"]} for r in train]
    held = PreferencePairDataset(write_parquet(counterfactual_pairs(world.held_out_scenes(), 96, seed=1),
                                               tmp_path / "held.parquet"), 64, drop_ties=False)  # fmt: skip
    acc = {}
    for name, rows in (("as labelled", train), ("swapped", swapped)):
        data = PreferencePairDataset(write_parquet(rows, tmp_path / f"{name[:2]}.parquet"), 64, drop_ties=False)
        torch.manual_seed(0)
        model = LatentRewardModel.from_components(comps, train_text_encoders=False)  # as `spoxl toy lrm`
        out = train_lrm(model, comps, data, held, steps=60, batch_size=16, lr=3e-4,
                        eval_timesteps=(1,))
        acc[name] = out["after"][1]
    assert acc["as labelled"] > 0.7 and acc["swapped"] < 0.35, acc  # measured 0.86 and 0.25
