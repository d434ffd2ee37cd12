"""The toy world: the caption grammar, the combination split, exact rendering."""

import itertools

import numpy as np
import pytest

from spoxl.errors import SpoxlError
from spoxl.toy import world


def test_split_holds_out_combinations_whose_parts_were_all_seen():
    train = {s.triple for s in world.train_scenes()}
    held = {s.triple for s in world.held_out_scenes()}
    assert len(held) == 18 and len(train) == 72  # 20% of the 90 (colour, shape, position) triples
    for i, j in itertools.combinations(range(3), 2):  # every attribute pair of a held-out triple was seen
        seen = {(t[i], t[j]) for t in train}
        assert all((t[i], t[j]) in seen for t in held)
    # every size and background appears with every held-out triple
    assert len(world.held_out_scenes()) == 18 * len(world.SIZES) * len(world.BACKGROUNDS)


def test_no_held_out_caption_reaches_pretraining_or_the_spo_prompts():
    from pathlib import Path

    from spoxl.toy.data import render_set

    held = set(world.held_out_captions())
    _, pretraining = render_set(600, seed=0)
    train = {s.caption() for s in world.train_scenes()}
    assert not held & set(pretraining) and set(pretraining) - {""} <= train
    assert len(set(pretraining) - {""}) > 0.95 * len(train)  # (a few drew the empty caption twice)
    prompt_file = Path(__file__).resolve().parents[2] / "configs" / "prompts" / "toy_train.txt"
    spo_prompts = prompt_file.read_text().splitlines()
    assert spo_prompts == [s.caption() for s in world.train_scenes()] and not held & set(spo_prompts)


def test_every_caption_parses_back_to_its_scene():
    for scene in world.all_scenes():
        assert world.parse_caption(scene.caption()) == scene


def test_caption_examples():
    s = world.Scene("red", "circle", "top left", "small", "black")
    assert s.caption() == "a small red circle at the top left on a black background"
    assert world.Scene("blue", "square", "center", "large", "white").caption() == \
        "a large blue square in the center on a white background"


@pytest.mark.parametrize("caption, missing", [
    ("a small circle at the top left on a black background", "colour"),
    ("a small red blue circle at the top left on a black background", "colour"),
    ("a small red at the top left on a black background", "shape"),
    ("a small red circle on a black background", "position"),
    ("a red circle at the top left on a black background", "size"),
    ("a small red circle at the top left", "background"),
    ("a small red circle at the top left in the center on a black background", "position"),
    ("a small red circle at the top left on a black background on a white background", "background"),
])
def test_bad_captions_are_one_line_errors(caption, missing):
    with pytest.raises(SpoxlError, match=missing) as e:
        world.parse_caption(caption)
    assert "\n" not in str(e.value)


def test_render_is_exact_and_draws_what_the_caption_says():
    s = world.Scene("green", "square", "bottom right", "large", "black")
    a, b = np.asarray(world.render(s)), np.asarray(world.render(s))
    assert (a == b).all() and a.shape == (64, 64, 3)
    # the square's centre pixel is the colour, the opposite corner is the background
    assert tuple(a[48, 48]) == (0, 255, 0) and tuple(a[8, 8]) == (0, 0, 0)
    side = world.SIZES["large"] * 64
    assert abs((a[..., 1] > 127).sum() - side**2) < 2 * side  # area within its anti-aliased rim
    t = np.asarray(world.render(world.Scene("green", "triangle", "bottom right", "large", "black")))
    # the triangle is half its bounding square, apex at the top
    assert abs((t[..., 1] > 127).sum() - side**2 / 2) < 2 * side
    assert t[48 - int(side / 2) + 2, 48, 1] > 127 and t[48 - int(side / 2) + 2, 48 - int(side / 2) + 2, 1] == 0
