"""The toy scorers rank an exact rendering above renderings with one attribute wrong."""

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spoxl.errors import SpoxlError
from spoxl.preference_models import build_preference_model
from spoxl.preference_models import SCORERS
from spoxl.toy import world
from spoxl.toy.scorers import ToyScorer, classify

def _other(values, value, scene):
    """Another value of an attribute, chosen by a stable function of the scene (not hash(),
    which Python salts per process)."""
    others = [v for v in values if v != value]
    return others[sum(map(ord, scene.caption())) % len(others)]


WRONG = {  # attribute -> a function giving another value of it
    "colour": lambda s: _other(list(world.COLOURS), s.colour, s),
    "shape": lambda s: _other(list(world.SHAPES), s.shape, s),
    "position": lambda s: _other(list(world.POSITIONS), s.position, s),
    "size": lambda s: "small" if s.size == "large" else "large",
    "background": lambda s: "white" if s.background == "black" else "black",
}
SPECIFIC = {"colour": "colour", "shape": "shape", "position": "position", "size": "size", "background": "background"}


def pixels(scene) -> torch.Tensor:
    return torch.from_numpy(np.asarray(world.render(scene)).copy()).permute(2, 0, 1).float() / 127.5 - 1


def scenes(n=24, seed=0):
    return random.Random(seed).sample(world.all_scenes(), n)


def variants(attr):
    exact, wrong, captions = [], [], []
    for s in scenes():
        exact.append(pixels(s))
        wrong.append(pixels(dataclasses.replace(s, **{attr: WRONG[attr](s)})))
        captions.append(s.caption())
    return torch.stack(exact), torch.stack(wrong), captions


@pytest.mark.parametrize("attr", list(WRONG))
def test_exact_rendering_beats_one_wrong_attribute_at_t0(attr):
    exact, wrong, captions = variants(attr)
    for kind in ("fidelity", SPECIFIC[attr]):
        scorer = ToyScorer(kind)
        s_exact, s_wrong = scorer.score(exact, captions, 0), scorer.score(wrong, captions, 0)
        assert (s_exact > s_wrong).all(), (kind, attr, (s_exact - s_wrong).min())


@pytest.mark.parametrize("attr", list(WRONG))
def test_ranking_holds_on_blurred_noisy_predictions(attr):
    """A noisy step's predicted x0 is a blurred, noisy version of the final image: the ranking
    survives it on average and for most items (the scorer is usable at moderate t). Shape is the
    attribute blur hurts most (a blurred small square is nearly a disc)."""
    exact, wrong, captions = variants(attr)
    g = torch.Generator().manual_seed(0)

    def degrade(x):
        x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return (x + 0.15 * torch.randn(x.shape, generator=g)).clamp(-1, 1)

    scorer = ToyScorer("fidelity")
    diff = scorer.score(degrade(exact), captions, 500) - scorer.score(degrade(wrong), captions, 500)
    assert diff.mean() > 3 and (diff > 0).float().mean() >= (0.75 if attr == "shape" else 0.9), (attr, diff)


def test_scale_convention_and_range():
    exact, wrong, captions = variants("colour")
    sims = ToyScorer().similarities(torch.cat([exact, wrong]), captions * 2)
    for k, v in sims.items():
        assert (v >= -1).all() and (v <= 1).all(), k
    assert (sims["fidelity"][:len(captions)] > 0.85).all()  # an exact rendering is near the top
    s = ToyScorer("fidelity", scale=7.0).score(exact, captions, 0)
    torch.testing.assert_close(s, 7.0 * sims["fidelity"][:len(captions)])
    blank = torch.full((1, 3, 64, 64), -1.0)  # black: no object on a black background
    assert ToyScorer("colour").score(blank, [world.Scene("red", "circle", "center", "small", "black").caption()], 0) \
        == pytest.approx(-100.0)


def test_aesthetic_prefers_clean_flat_colour_to_noise_and_ignores_the_caption():
    exact, _, captions = variants("colour")
    noisy = (exact + 0.4 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    scorer = ToyScorer("aesthetic")
    assert (scorer.score(exact, captions, 0) > scorer.score(noisy, captions, 0) + 50).all()
    torch.testing.assert_close(scorer.score(exact, captions, 0), scorer.score(exact, captions[::-1], 0))


def test_classify_reads_back_every_exact_rendering():
    all_scenes = world.all_scenes()
    x = torch.stack([pixels(s) for s in all_scenes])
    preds = classify(x, [s.background for s in all_scenes])
    for s, p in zip(all_scenes, preds):
        assert (p.colour, p.shape, p.position, p.size) == (s.colour, s.shape, s.position, s.size), s
    wrong = torch.stack([pixels(dataclasses.replace(s, colour=WRONG["colour"](s))) for s in all_scenes[:10]])
    correct = ToyScorer().correct(wrong, [s.caption() for s in all_scenes[:10]])
    assert not correct["colour"].any() and correct["shape"].all()


def test_registered_as_preference_models_with_the_one_interface():
    for name in ("fidelity", "aesthetic", "toy_colour", "toy_shape", "toy_position", "toy_size", "toy_background"):
        assert name in SCORERS
        m = build_preference_model(name, scale=50.0)
        assert m.input == "images" and m.scale == 50.0
    with pytest.raises(SpoxlError, match="exactly one background"):
        build_preference_model("fidelity").check_prompts(["a red circle"])
    with pytest.raises(SpoxlError, match="timesteps"):
        ToyScorer().score(torch.zeros(2, 3, 64, 64), ["a small red circle in the center on a black background"] * 2,
                          torch.tensor([1, 2, 3]))
