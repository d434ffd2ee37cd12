"""The step-wise pool sampler: pairs from one x_t, thresholding, the random continuation, batching."""

import pytest
import torch

from spoxl import kernels, sampling
from spoxl.errors import SpoxlError
from spoxl.models.scorers import ColourScorer
from spoxl.spo.pool_sampler import PoolSampler, PoolSamplerConfig, pair_gap
from pool_inputs import PROMPTS, CountingUNet, setup  # noqa: F401  (setup: a fixture)
from spo_threads import one_thread  # noqa: F401  (autouse fixture)


class FixedScorer:
    """Scores decided by the test: a function of the candidate's latents (no decode)."""

    input = "latents"

    def __init__(self, fn):
        self.fn = fn
        self.calls = []

    def score(self, x, prompts, timesteps):
        s = self.fn(x)
        self.calls.append((int(torch.as_tensor(timesteps).flatten()[0]), s.clone()))
        return s


def run(setup, scorer, seed=0, **cfg):
    comps, cond, uncond, time_ids, latents = setup
    config = PoolSamplerConfig(**{"steps": 8, "divert_start_step": 2, "pool_size": 2, "num_inner_step": 0,
                                  "threshold": 0.4, "cfg_scale": 5.0, **cfg})
    sampler = PoolSampler(config, comps.scheduler, comps.vae, scorer)
    unet = CountingUNet(comps.unet)
    result = sampler.sample(unet, PROMPTS, cond, uncond, time_ids, latents, torch.Generator().manual_seed(seed))
    return result, unet


def mean_at(setup, x_t, t, idx):
    """The DDIM(eta=1) mean at x_t recomputed from scratch with the same UNet and CFG."""
    comps, cond, uncond, time_ids, _ = setup
    steps = 8
    a = sampling.alpha_bar(comps.scheduler, t)
    a_prev = sampling.alpha_bar(comps.scheduler, sampling.prev_timestep(comps.scheduler, t, steps))
    with torch.no_grad():
        out = sampling.guided_output(comps.unet, x_t, t, cond.index(idx), uncond.index(idx), time_ids[idx], 5.0)
    x0, eps = sampling.split_prediction(out, x_t, a)
    std = sampling.ddim_std(a, a_prev, 1.0)
    return sampling.ddim_mean(x0, eps, a_prev, std), std


def test_pairs_share_x_t_and_mean_and_logprobs_match(setup):
    big = ColourScorer(scale=1e6)  # every pair passes the threshold
    result, _ = run(setup, big, pool_size=4)
    pairs = result.pairs
    assert len(pairs) > 0 and pairs.shared.all()
    torch.testing.assert_close(pairs.x_t_w, pairs.x_t_l, rtol=0, atol=0)
    assert not torch.allclose(pairs.x_w, pairs.x_l)
    for i in range(len(pairs)):
        t = int(pairs.timestep[i])
        idx = pairs.prompt_index[i : i + 1]
        mean, std = mean_at(setup, pairs.x_t_w[i : i + 1], t, idx)
        torch.testing.assert_close(pairs.std[i], std, rtol=1e-5, atol=0)
        # w and l come from the same mean: their log-probs under it are what the sampler stored.
        logp_w = kernels.transition_logprob(pairs.x_w[i : i + 1], mean, std)
        logp_l = kernels.transition_logprob(pairs.x_l[i : i + 1], mean, std)
        torch.testing.assert_close(logp_w, pairs.logp_w[i : i + 1], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logp_l, pairs.logp_l[i : i + 1], rtol=1e-4, atol=1e-4)
        # and the residuals are standard noise (mean over 256 elements of z^2 ~ 1).
        z = (pairs.x_w[i] - mean[0]) / std
        assert 0.6 < float(z.pow(2).mean()) < 1.5


def test_chunked_branching_keeps_every_transition_of_both_chains(setup):
    big = ColourScorer(scale=1e6)
    result, unet = run(setup, big, pool_size=2, num_inner_step=2)  # segments at steps 2, 5; last is 5..7
    pairs = result.pairs
    timesteps = [int(t) for t in sampling.inference_timesteps(setup[0].scheduler, 8)]
    # each kept prompt contributes one pair per step of its segment, the first shared, the rest not
    kept_per_segment = {timesteps[2]: 3, timesteps[5]: 3}
    expected = sum(result.accepted[t] * n for t, n in kept_per_segment.items())
    assert len(pairs) == expected > 0
    assert pairs.shared.sum() == sum(result.accepted.values())
    firsts = pairs.timestep[pairs.shared]
    assert set(firsts.tolist()) <= set(kept_per_segment)
    unshared = ~pairs.shared
    assert not torch.allclose(pairs.x_t_w[unshared], pairs.x_t_l[unshared])
    # an inner transition's log-prob is under the mean at ITS OWN x_t
    i = int(unshared.nonzero()[0])
    mean, std = mean_at(setup, pairs.x_t_l[i : i + 1], int(pairs.timestep[i]), pairs.prompt_index[i : i + 1])
    torch.testing.assert_close(kernels.transition_logprob(pairs.x_l[i : i + 1], mean, std),
                               pairs.logp_l[i : i + 1], rtol=1e-4, atol=1e-4)  # fmt: skip
    # one UNet call per denoising step for the whole pool: prompts x k candidates, CFG doubled
    assert len(unet.batches) == 8 == result.unet_calls
    assert unet.batches[:3] == [2 * 3] * 3 and unet.batches[3:] == [2 * 3 * 2] * 5


def test_one_unet_call_per_step_per_step_branching(setup):
    result, unet = run(setup, ColourScorer(), pool_size=4)
    assert len(unet.batches) == 8
    assert unet.batches[:3] == [2 * 3] * 3  # steps 0-2 run on x_t itself (step 2 feeds the first pool)
    assert unet.batches[3:] == [2 * 3 * 4] * 5


def test_threshold_drops_close_pairs(setup):
    # constant scores: softmax gap 0 -> nothing kept
    flat = FixedScorer(lambda x: torch.zeros(x.shape[0]))
    result, _ = run(setup, flat)
    assert len(result.pairs) == 0 and sum(result.offered.values()) == 3 * 6
    # real scores: a pair is kept exactly when its recorded gap exceeds the threshold
    scorer = FixedScorer(lambda x: 30 * x.flatten(1).mean(1))
    result, _ = run(setup, scorer, threshold=0.3)
    expected = {}
    for t_score, s in scorer.calls:
        s = s.view(3, 2)
        gap = pair_gap(s.max(1).values, s.min(1).values)
        expected[t_score] = int((gap > 0.3).sum())
    kept = sum(expected.values())
    assert 0 < kept < 3 * 6, "the test needs both kept and dropped pairs"
    assert len(result.pairs) == kept == sum(result.accepted.values())


def test_pool_pairs_hand_computed(setup):
    """best_worst: one pair per pool (best over worst, gap over the threshold); all: every two
    candidates whose gap is over it, the higher-scored one the winner. Threshold 0.4 keeps a pair
    when the scores differ by more than 2 atanh(0.4) = 0.847."""
    comps = setup[0]
    scores = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0], [5.0, 4.9, 0.0]])

    def pairs(mode):
        sampler = PoolSampler(PoolSamplerConfig(steps=8, divert_start_step=2, pairs_per_pool=mode), comps.scheduler,
                              comps.vae, ColourScorer())  # fmt: skip
        return [tuple(int(v) for v in row) for row in zip(*sampler.pool_pairs(scores, 1))]

    assert pairs("best_worst") == [(0, 0, 1), (2, 0, 2)]
    assert pairs("all") == [(0, 0, 1), (0, 0, 2), (0, 2, 1), (2, 0, 2), (2, 1, 2)]  # not (2, 0, 1): 0.1 apart


def test_all_pairs_mode_keeps_every_pair_over_the_threshold(setup):
    scorer = FixedScorer(lambda x: 30 * x.flatten(1).mean(1))
    result, _ = run(setup, scorer, threshold=0.3, pool_size=4, pairs_per_pool="all")
    expected, pools = 0, 0
    for _, s in scorer.calls:
        s = s.view(3, 4)
        hi, lo = s[:, :, None].expand(-1, -1, 4), s[:, None, :].expand(-1, 4, -1)
        ok = (hi > lo) & (torch.tanh((hi - lo) / 2) > 0.3)  # the softmax gap of two scores
        expected += int(ok.sum())
        pools += int(ok.flatten(1).any(1).sum())
    assert pools < expected, "the test needs pools that give more than one pair"
    assert len(result.pairs) == expected and sum(result.accepted.values()) == pools
    # each pair's winner is its own candidate, not the pool's best: more distinct winners than pools
    assert len({tuple(x.flatten()[:4].tolist()) for x in result.pairs.x_w}) > pools
    # the same seed in best_worst mode: the same trajectory, one pair per kept pool
    single, _ = run(setup, FixedScorer(lambda x: 30 * x.flatten(1).mean(1)), threshold=0.3, pool_size=4)
    torch.testing.assert_close(single.final_latents, result.final_latents, rtol=0, atol=0)
    assert len(single.pairs) == pools


def test_pairs_per_pool_reaches_the_sampler_from_the_config_and_bad_values_are_refused(tmp_path):
    from spoxl.config import load_config
    from spoxl.methods.spo import SPOObjective

    def sampler_config(*overrides):
        cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", *overrides])
        return SPOObjective.from_recipe(cfg).config.sampler_config()

    assert sampler_config().pairs_per_pool == "best_worst"  # the official recipe by default
    assert sampler_config("method.pairs_per_pool=all").pairs_per_pool == "all"
    with pytest.raises(SpoxlError, match="pairs_per_pool"):
        sampler_config("method.pairs_per_pool=best")
    with pytest.raises(SpoxlError, match="pairs_per_pool"):
        PoolSamplerConfig(pairs_per_pool="best").validate()


def test_continuation_is_random_and_independent_of_scores(setup):
    up = FixedScorer(lambda x: 1e3 * x.flatten(1).mean(1))
    down = FixedScorer(lambda x: -1e3 * x.flatten(1).mean(1))
    r_up, _ = run(setup, up, seed=5, pool_size=4)
    r_down, _ = run(setup, down, seed=5, pool_size=4)
    # the same choices and the same trajectory whatever the scorer says
    for a, b in zip(r_up.choices, r_down.choices):
        assert torch.equal(a, b)
    torch.testing.assert_close(r_up.final_latents, r_down.final_latents, rtol=0, atol=0)
    # the winners differ (the scorers disagree), so pairs differ while the continuation does not
    assert not torch.allclose(r_up.pairs.x_w, r_down.pairs.x_w)
    # not the best candidate every time, and more than one index used
    chosen = torch.cat(r_up.choices)
    best = torch.cat([s.view(3, 4).argmax(1) for _, s in up.calls])
    assert (chosen != best).any() and len(set(chosen.tolist())) > 1
    # a different seed gives different choices
    r_other, _ = run(setup, up, seed=6, pool_size=4)
    assert any(not torch.equal(a, b) for a, b in zip(r_up.choices, r_other.choices))


def test_bad_sampler_settings():
    with pytest.raises(SpoxlError, match="eta > 0"):
        PoolSamplerConfig(eta=0.0).validate()
    with pytest.raises(SpoxlError, match="pool_size"):
        PoolSamplerConfig(pool_size=1).validate()
    with pytest.raises(SpoxlError, match="divert_start_step"):
        PoolSamplerConfig(steps=4, divert_start_step=4).validate()


def test_branch_repeats_branch_each_prompt_state_R_times(setup):
    """branch_repeats R: the early steps once per prompt, then R independent branching phases from
    that state in the same UNet calls; every pair's prompt_index names the caller's prompt, whose
    embeddings its log-probs were computed under."""
    big = ColourScorer(scale=1e6)  # every pool gives a pair
    once, _ = run(setup, big, pool_size=2)
    result, unet = run(setup, big, pool_size=2, branch_repeats=2)
    assert unet.batches[:3] == [2 * 3] * 3  # steps 0-2: each prompt once
    assert unet.batches[3:] == [2 * 3 * 2 * 2] * 5  # then 3 prompts x 2 phases x k = 2, CFG doubled
    assert result.unet_calls == 8 and set(result.offered.values()) == {3 * 2}
    assert len(result.pairs) == 2 * len(once.pairs) == 2 * 3 * 6
    timesteps = [int(t) for t in sampling.inference_timesteps(setup[0].scheduler, 8)]
    pairs = result.pairs
    first = (pairs.timestep == timesteps[2]).nonzero().flatten()
    assert pairs.prompt_index[first].tolist() == [0, 0, 1, 1, 2, 2]  # prompt-major, R per prompt
    for p in range(3):  # the two phases of a prompt branch from ITS one state, with their own noises
        a, b = first[2 * p], first[2 * p + 1]
        torch.testing.assert_close(pairs.x_t_w[a], pairs.x_t_w[b], rtol=0, atol=0)
        assert not torch.allclose(pairs.x_w[a], pairs.x_w[b])
    assert not torch.equal(pairs.x_t_w[first[0]], pairs.x_t_w[first[2]])
    for i in range(len(pairs)):  # the prompt_index maps back to the embeddings the log-probs used
        idx = pairs.prompt_index[i : i + 1]
        mean, std = mean_at(setup, pairs.x_t_w[i : i + 1], int(pairs.timestep[i]), idx)
        torch.testing.assert_close(kernels.transition_logprob(pairs.x_w[i : i + 1], mean, std),
                                   pairs.logp_w[i : i + 1], rtol=1e-4, atol=1e-4)  # fmt: skip
    assert result.final_latents.shape[0] == 3 * 2 and result.final_scores.shape == (3 * 2, 2)


def test_branch_repeats_reach_the_sampler_and_bad_values_are_refused(tmp_path):
    from spoxl.config import load_config
    from spoxl.methods.spo import SPOObjective

    def objective(*overrides):
        cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", *overrides])
        return cfg, SPOObjective.from_recipe(cfg)

    cfg, obj = objective()
    assert obj.config.sampler_config().branch_repeats == 1  # the official sampler by default
    assert SPOObjective.sampling_batch(cfg) == (2 * 2 * 4, 2 * 4)  # CFG x 2 prompts x k = 4; their decodes
    cfg, obj = objective("method.branch_repeats=3")
    assert obj.config.sampler_config().branch_repeats == 3
    assert SPOObjective.sampling_batch(cfg) == (2 * 2 * 3 * 4, 2 * 3 * 4)  # preflight sizes the wider calls
    for bad in (0, -1, True, 1.5):
        with pytest.raises(SpoxlError, match="branch_repeats must be a positive integer"):
            PoolSamplerConfig(branch_repeats=bad).validate()
    with pytest.raises(SpoxlError, match="branch_repeats"):
        objective("method.branch_repeats=0")[1].check(None)
    with pytest.raises(SpoxlError, match="there are none"):  # nothing before the branching to share
        PoolSamplerConfig(branch_repeats=2, divert_start_step=0).validate()
    PoolSamplerConfig(branch_repeats=2, divert_start_step=1).validate()


def test_a_final_one_step_segment_folds_into_the_previous_one():
    """Official sampler: it never branches at the final step; that step continues the previous
    segment's chains, which are then scored at t = 0."""
    from spoxl.spo.pool_sampler import segments

    assert segments(20, 4, 3) == [(4, 8), (8, 12), (12, 16), (16, 20)]  # the SDXL recipe: no tail
    assert segments(21, 4, 3) == [(4, 8), (8, 12), (12, 16), (16, 21)]  # (21 - 4) % 4 == 1: folded
    assert segments(22, 4, 3) == [(4, 8), (8, 12), (12, 16), (16, 20), (20, 22)]  # a 2-step tail stays
    assert segments(20, 15, 0) == [(15, 16), (16, 17), (17, 18), (18, 19), (19, 20)]  # per-step: never folds
    assert segments(10, 9, 3) == [(9, 10)]  # a single segment is kept


def test_sampler_folds_the_tail_segment(setup):
    big = ColourScorer(scale=1e6)
    result, unet = run(setup, big, pool_size=2, num_inner_step=1, steps=8, divert_start_step=1)  # (8-1) % 2 == 1
    timesteps = [int(t) for t in sampling.inference_timesteps(setup[0].scheduler, 8)]
    assert sorted(result.offered, reverse=True) == [timesteps[1], timesteps[3], timesteps[5]]  # no pool at step 7
    # the last segment's chains take steps 5, 6 and 7: three transitions per kept prompt there
    kept = result.accepted[timesteps[5]]
    assert int((result.pairs.timestep == timesteps[7]).sum()) == kept > 0
    assert len(unet.batches) == 8 == result.unet_calls


def test_lookahead_grid_hand_computed():
    from spoxl.spo.pool_sampler import lookahead_grid

    assert lookahead_grid(451, 3) == [451, 301, 150, 0]
    assert lookahead_grid(100, 2) == [100, 50, 0]
    assert lookahead_grid(51, 1) == [51, 0]
    with pytest.raises(SpoxlError, match="jumps"):  # more jumps than timesteps would repeat grid points
        lookahead_grid(2, 3)


class RecordingScorer(FixedScorer):
    """A FixedScorer that also keeps what it was shown."""

    def __init__(self, fn):
        super().__init__(fn)
        self.inputs = []

    def score(self, x, prompts, timesteps):
        self.inputs.append(x.clone())
        return super().score(x, prompts, timesteps)


def test_lookahead_judges_the_end_of_a_deterministic_rollout(setup):
    """lookahead_steps 3: each pool is judged (at t = 0) on the latents that min(3, steps left)
    DDIM eta-0 jumps reach from its candidates, recomputed here by hand from the UNet; the
    trajectory itself (the chain's continuation, pairs' transitions) is the same as without."""
    comps, cond, uncond, time_ids, _ = setup
    sched = comps.scheduler
    fn = lambda x: 1e4 * x.flatten(1).mean(1)  # noqa: E731  every pool over the threshold
    plain_scorer, look_scorer = RecordingScorer(fn), RecordingScorer(fn)
    plain, plain_unet = run(setup, plain_scorer, seed=4, pool_size=2)
    look, look_unet = run(setup, look_scorer, seed=4, pool_size=2, lookahead_steps=3)
    ts = [int(t) for t in sampling.inference_timesteps(sched, 8)]

    # steps 2..7 branch; pools ending at step 3..5 have >= 3 steps left (2 more UNet calls each),
    # the one ending at step 6 has 2 (1 more), at step 7 one (none: its predicted x0, at t_score)
    assert [t for t, _ in look_scorer.calls] == [0, 0, 0, 0, ts[7], 0]
    assert [t for t, _ in plain_scorer.calls] == ts[3:] + [0]
    assert look.unet_calls == len(look_unet.batches) == plain.unet_calls + 2 * 3 + 1
    assert look_unet.batches.count(2 * 3 * 2) == plain_unet.batches.count(2 * 3 * 2) + 7

    # the first pool by hand: candidates (every pool gives a pair: w and l are the pool), 3 jumps
    # from ts[3] on the grid [ts[3], 2 ts[3] / 3, ts[3] / 3, 0]
    first = look.pairs.timestep == ts[2]
    cand = torch.stack([look.pairs.x_w[first], look.pairs.x_l[first]], 1)  # [3 prompts, 2, ...]
    idx = look.pairs.prompt_index[first]
    y = cand.flatten(0, 1)
    rep = lambda e: e.index(idx.repeat_interleave(2))  # noqa: E731
    grid = [ts[3], round(2 * ts[3] / 3), round(ts[3] / 3)]
    with torch.no_grad():
        for i, t in enumerate(grid):
            out = sampling.guided_output(comps.unet, y, t, rep(cond), rep(uncond), time_ids[idx.repeat_interleave(2)], 5.0)
            x0, eps = sampling.split_prediction(out, y, sampling.alpha_bar(sched, t))
            if i + 1 < len(grid):
                a = sampling.alpha_bar(sched, grid[i + 1])
                y = a.sqrt() * x0 + (1 - a).sqrt() * eps
    judged = look_scorer.inputs[0].view(3, 2, *x0.shape[1:])[idx]
    # the scorer saw each pool's candidates in the sampler's order; w/l is that order sorted by score
    s = look_scorer.calls[0][1].view(3, 2)[idx]
    order = torch.stack([s.argmax(1), s.argmin(1)], 1)
    judged = torch.stack([judged[i, order[i]] for i in range(len(idx))])
    torch.testing.assert_close(judged.flatten(0, 1), x0, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(look_scorer.inputs[0], plain_scorer.inputs[0], atol=1e-3)  # not the predicted x0

    # the chain does not depend on how pools are judged
    for a, b in zip(plain.choices, look.choices):
        assert torch.equal(a, b)
    torch.testing.assert_close(plain.final_latents, look.final_latents, rtol=0, atol=0)
    # nor do the transitions: every pool gives a pair in both runs, from the same x_t, the same two
    # candidates with the same log-probs; only which one is the winner may differ
    assert torch.equal(plain.pairs.timestep, look.pairs.timestep) and torch.equal(plain.pairs.prompt_index, look.pairs.prompt_index)
    torch.testing.assert_close(plain.pairs.x_t_w, look.pairs.x_t_w, rtol=0, atol=0)
    for i in range(len(look.pairs)):
        same = torch.equal(plain.pairs.x_w[i], look.pairs.x_w[i])
        p_w, p_l = (plain.pairs.x_w[i], plain.pairs.x_l[i]) if same else (plain.pairs.x_l[i], plain.pairs.x_w[i])
        assert torch.equal(p_w, look.pairs.x_w[i]) and torch.equal(p_l, look.pairs.x_l[i])
        lp = (plain.pairs.logp_w[i], plain.pairs.logp_l[i]) if same else (plain.pairs.logp_l[i], plain.pairs.logp_w[i])
        assert torch.equal(lp[0], look.pairs.logp_w[i]) and torch.equal(lp[1], look.pairs.logp_l[i])


def test_lookahead_with_inner_steps_keeps_the_chains(setup):
    """Chunked branching (the SDXL recipe's shape): the lookahead runs from each segment's end,
    the chains and the number of kept transitions stay those of the plain judge."""
    fn = lambda x: 1e4 * x.flatten(1).mean(1)  # noqa: E731
    plain, plain_unet = run(setup, RecordingScorer(fn), seed=2, pool_size=2, num_inner_step=2)
    look_scorer = RecordingScorer(fn)
    look, look_unet = run(setup, look_scorer, seed=2, pool_size=2, num_inner_step=2, lookahead_steps=2)
    torch.testing.assert_close(plain.final_latents, look.final_latents, rtol=0, atol=0)
    assert len(plain.pairs) == len(look.pairs) > 0
    ts = [int(t) for t in sampling.inference_timesteps(setup[0].scheduler, 8)]
    assert [t for t, _ in look_scorer.calls] == [0, 0]  # segments 2..5 (3 steps left) and 5..8 (the final images)
    assert look.unet_calls == plain.unet_calls + 1 and ts[5] in look.offered


def test_lookahead_reaches_the_sampler_from_the_config_and_bad_values_are_refused(tmp_path):
    from spoxl.config import load_config
    from spoxl.methods.spo import SPOObjective

    def sampler_config(*overrides):
        cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", *overrides])
        return SPOObjective.from_recipe(cfg).config.sampler_config()

    assert sampler_config().lookahead_steps == 1  # the official judge (predicted x0) by default
    assert sampler_config("method.lookahead_steps=3").lookahead_steps == 3
    cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", "method.lookahead_steps=0"])
    with pytest.raises(SpoxlError, match="method: lookahead_steps must be >= 1"):  # before launch (--dry-run)
        SPOObjective.from_recipe(cfg).check(cfg)
    with pytest.raises(SpoxlError, match="lookahead_steps"):
        PoolSamplerConfig(score_candidates=True, num_inner_step=0, lookahead_steps=2).validate()


def _output_dtypes(module: torch.nn.Module, seen: list):
    """A forward hook recording each call's output dtype (the caller removes it)."""
    return module.register_forward_hook(lambda m, args, out: seen.append(out.dtype))


@pytest.mark.parametrize("autocast, compute, vae_compute", [(None, torch.float32, torch.float32),
                                                          ("bf16", torch.bfloat16, torch.bfloat16),
                                                          ("fp16", torch.float16, torch.float32)])
def test_autocast_rounds_compute_in_half_precision_and_hand_back_fp32(setup, autocast, compute, vae_compute):
    """bf16 runs the UNet and the VAE decode in bf16; fp16 the UNet only (SDXL's VAE overflows in fp16)."""
    comps = setup[0]
    unet_out, vae_out = [], []
    hooks = [_output_dtypes(comps.unet.conv_out, unet_out), _output_dtypes(comps.vae.decoder.conv_out, vae_out)]
    try:  # ColourScorer judges decoded images: both the UNet and the VAE run in the round
        result, unet = run(setup, ColourScorer(scale=1e6), pool_size=4, autocast=autocast)
    finally:
        for h in hooks:
            h.remove()
    assert len(unet_out) == len(unet.batches) and set(unet_out) == {compute}
    assert vae_out and set(vae_out) == {vae_compute}
    pairs = result.pairs
    assert len(pairs) > 0
    for name in ("x_t_w", "x_w", "x_l", "logp_w", "logp_l", "std"):
        value = getattr(pairs, name)
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
    assert result.final_latents.dtype == torch.float32


def test_autocast_bf16_moves_a_round_by_rounding_only(setup):
    """Same noise, same scorer: the bf16 round's first-step pools are the fp32 round's up to bf16
    rounding of the model's outputs (a wrong cast or a dropped CFG half would move them by far more)."""
    scores = {}
    for autocast in (None, "bf16"):
        scorer = FixedScorer(lambda x: x.flatten(1).mean(1))
        run(setup, scorer, pool_size=2, autocast=autocast)
        scores[autocast] = scorer.calls[0][1]
    diff = (scores["bf16"] - scores[None]).abs().max()
    assert 0 < diff < 0.02 * scores[None].abs().max() + 1e-3, (diff, scores)


def test_an_unknown_autocast_dtype_is_refused():
    with pytest.raises(SpoxlError, match="autocast must be one of bf16, fp16 or null"):
        PoolSamplerConfig(autocast="fp8").validate()
