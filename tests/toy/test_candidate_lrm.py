"""spoxl.commands.toy_candidate_lrm: the toy LRM taught on pool candidates of one x_t.

The pairs must be what LPO asks the LRM about (two candidates x_{t-1} of one pool, at the pool's t)
with the exact judge's order (the winner's decoded predicted x0 scores higher); training on them
must move the LRM towards their order, and towards the opposite order when the labels are swapped."""

import sys
from pathlib import Path

import pytest
import torch

from spoxl import sampling
from spoxl.models.loading import load_sdxl
from spoxl.models.lrm import LatentRewardModel
from spoxl.models.text import encode_with_negative, make_time_ids
from spoxl.toy import world
from spoxl.commands.toy_candidate_lrm import pair_accuracy, sample_candidate_pairs, train_on_candidates
from spoxl.toy.scorers import ToyScorer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spo"))
from spo_threads import one_thread  # noqa: F401,E402  (autouse fixture: one intra-op thread)

SCENES = world.train_scenes()[:6]
CAPTIONS = [s.caption() for s in SCENES]


@pytest.fixture(scope="module")
def toy():
    return load_sdxl("toy")


@pytest.fixture(scope="module")
def candidate_pairs(toy):
    return sample_candidate_pairs(toy, CAPTIONS, divert_start_step=16, min_gap=0.0, batch=3, seed=0, progress=False)


def test_pairs_are_candidates_of_one_pool_in_the_exact_judges_order(toy, candidate_pairs):
    pairs, captions = candidate_pairs
    assert len(pairs) >= 6 and len(captions) == len(pairs)
    assert set(captions) <= set(CAPTIONS)
    assert pairs.shared.all()  # per-step pools: winner and loser come from ONE x_t
    torch.testing.assert_close(pairs.x_t_w, pairs.x_t_l)
    grid = [int(t) for t in sampling.inference_timesteps(toy.scheduler, 20)]
    assert set(pairs.timestep.tolist()) <= set(grid[16:])  # the pools' own t, from the divert step on
    # The exact judge, recomputed here: each candidate's predicted x0 at the next grid timestep
    # (the final latents themselves after the last step), decoded and scored on its caption.
    cond, uncond = encode_with_negative(toy, captions)
    scorer = ToyScorer()
    scores = []
    for x in (pairs.x_w, pairs.x_l):
        x0 = torch.empty_like(x)
        with torch.no_grad():
            for i, t in enumerate(pairs.timestep.tolist()):
                t_next = int(sampling.prev_timestep(toy.scheduler, t, 20))
                if t_next < 0:
                    x0[i] = x[i]
                    continue
                one = lambda e: e.index(torch.tensor([i]))  # noqa: E731
                out = sampling.guided_output(toy.unet, x[i : i + 1], t_next, one(cond), one(uncond),
                                             make_time_ids(1, (64, 64)), 5.0)  # fmt: skip
                a = sampling.alpha_bar(toy.scheduler, t_next)
                x0[i] = sampling.split_prediction(out, x[i : i + 1], a, "epsilon")[0][0]
            scores.append(scorer.score(sampling.decode_latents(toy.vae, x0), captions, 0))
    assert (scores[0] > scores[1]).all()


def test_all_pairs_of_a_pool_contain_its_best_worst_pair_and_more(toy, candidate_pairs):
    """pairs_per_pool "all" reaches the sampler: the same seed draws the same pools, so every
    best-worst pair is among the pairs, once, and the pools give more besides."""
    best_worst, _ = candidate_pairs
    every, captions = sample_candidate_pairs(toy, CAPTIONS, divert_start_step=16, min_gap=0.0, batch=3, seed=0,
                                             progress=False, pairs_per_pool="all")  # fmt: skip
    assert len(every) > len(best_worst) and len(captions) == len(every)
    for i in range(len(best_worst)):
        # close, not equal: with several intra-op threads the wider "all" batch may sum in another order
        same = ((every.x_w - best_worst.x_w[i]).flatten(1).abs().amax(1) < 1e-4) & \
               ((every.x_l - best_worst.x_l[i]).flatten(1).abs().amax(1) < 1e-4)
        assert same.sum() == 1


def test_training_follows_the_pairs_order_and_the_swapped_order(toy, candidate_pairs):
    pairs, captions = candidate_pairs
    swapped = pairs.index(torch.arange(len(pairs)))
    swapped.x_w, swapped.x_l = pairs.x_l.clone(), pairs.x_w.clone()

    def trained(on):
        model = LatentRewardModel.from_components(toy, train_text_encoders=False)
        before = pair_accuracy(model, pairs, captions)
        train_on_candidates(model, on, captions, steps=30, batch_size=len(on), lr=3e-4, seed=0)
        return before, pair_accuracy(model, pairs, captions)

    mean = lambda acc: sum(acc.values()) / len(acc)  # noqa: E731
    before, after = trained(pairs)
    _, after_swapped = trained(swapped)
    assert mean(after) >= 0.9 and mean(after) > mean(before)
    assert mean(after_swapped) <= 0.1


def test_cli_candidates_source_end_to_end_on_a_few_captions(tmp_path, monkeypatch, capsys):
    """`spoxl toy lrm --source candidates --pairs-per-pool all` on 3 training and 3 held-out scenes:
    the folder loads as an LRM (the recipe's preference.path), lrm.json reports what it was taught
    on, every pair of a pool went into training and the held-out pairs stayed best vs worst."""
    import json

    from spoxl.cli import main
    from spoxl.preference_models import build_lrm

    monkeypatch.setattr(world, "train_scenes", lambda: SCENES[:3])
    monkeypatch.setattr(world, "held_out_scenes", lambda: SCENES[3:6])
    out = tmp_path / "lrm"
    assert main(["toy", "lrm", "--source", "candidates", "--out", str(out), "--passes", "1", "--divert-start-step", "17",
                 "--min-gap", "0", "--steps", "2", "--batch-size", "2", "--pairs-per-pool", "all"]) == 0  # fmt: skip
    record = json.loads((out / "lrm.json").read_text())
    assert record["settings"]["source"] == "candidates" and record["settings"]["steps"] == 2
    assert record["settings"]["pairs_per_pool"] == "all" and record["settings"]["data"].startswith("every two")
    pools = 3 * 3  # 3 captions x pools at steps 17, 18, 19: best vs worst gives at most one pair each
    assert record["train_pairs"] > pools and 1 <= record["held_out_pairs"] <= pools
    assert record["held_out_accuracy_after"] and set(record["held_out_accuracy_after"]) <= {"101", "51", "1"}
    assert build_lrm(str(out)).input == "latents"


def test_cli_bad_settings_are_one_line_errors(tmp_path, capsys):
    from spoxl.cli import main

    for argv, message in [(["--source", "candidates", "--pairs", "5"], "--pairs does not apply to --source candidates"),
                          (["--passes", "2"], "--passes does not apply to --source counterfactual"),
                          (["--source", "candidates", "--min-gap", "1.5"], "--min-gap must be in [0, 1), got 1.5"),
                          (["--source", "candidates", "--divert-start-step", "20"], "--divert-start-step must be in [0, 20)"),
                          (["--source", "candidates", "--passes", "0"], "--passes must be >= 1, got 0"),
                          (["--source", "candidates", "--pairs-per-pool", "best"], "--pairs-per-pool must be one of best_worst, all"),
                          (["--source", "candidates", "--init", str(tmp_path / "no-lrm")], "no-lrm")]:  # fmt: skip
        assert main(["toy", "lrm", "--out", str(tmp_path / "x"), *argv]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()


class RecordingLRM(torch.nn.Module):
    """Scores a latent by one weight times its mean and records the timesteps it is asked at."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen: list[int] = []

    def score(self, latents, prompts, timesteps):
        self.seen += torch.as_tensor(timesteps).flatten().tolist()
        return self.w * latents.flatten(1).mean(1)


def test_training_and_accuracy_score_each_pair_at_its_pools_t(candidate_pairs):
    """LPO scores the candidates x_{t-1} at the CURRENT t (the pool's): teaching or measuring at
    the next timestep, or at a constant, would be a different judge."""
    pairs, captions = candidate_pairs
    model = RecordingLRM()
    acc = pair_accuracy(model, pairs, captions)
    assert sorted(model.seen) == sorted(pairs.timestep.tolist() * 2)  # winner and loser, each at its pool's t
    assert set(acc) == set(pairs.timestep.tolist())
    model.seen.clear()
    train_on_candidates(model, pairs, captions, steps=1, batch_size=len(pairs), lr=1e-3)
    assert sorted(model.seen) == sorted(pairs.timestep.tolist() * 2)


def test_cli_gives_each_source_its_own_defaults(tmp_path, monkeypatch):
    import spoxl.commands.toy_lrm as toy_lrm
    from spoxl.cli import main

    seen = {}

    def fake(name):
        def make(out, **settings):
            seen[name] = settings
            return {"held_out_accuracy_after": {}, "seconds": 0}
        return make

    monkeypatch.setattr(toy_lrm, "make_toy_lrm", fake("counterfactual"))
    monkeypatch.setattr(toy_lrm, "make_toy_lrm_from_candidates", fake("candidates"))
    assert main(["toy", "lrm", "--out", str(tmp_path / "a")]) == 0
    assert main(["toy", "lrm", "--source", "candidates", "--out", str(tmp_path / "b"), "--steps", "7"]) == 0
    assert seen["counterfactual"] == toy_lrm.DEFAULTS
    assert seen["candidates"] == {**toy_lrm.CANDIDATE_DEFAULTS, "steps": 7}
    assert main(["toy", "lrm", "--source", "candidates", "--out", str(tmp_path / "c"), "--pairs-per-pool", "all"]) == 0
    assert seen["candidates"] == {**toy_lrm.CANDIDATE_DEFAULTS, "pairs_per_pool": "all"}
    assert toy_lrm.CANDIDATE_DEFAULTS["pairs_per_pool"] == "best_worst"
    assert toy_lrm.DEFAULTS["steps"] != toy_lrm.CANDIDATE_DEFAULTS["steps"]  # so the check above can tell them apart
