"""The latent cache keeps winner and loser apart: the cached latents of w decode to the pixels of
w (not l), and relabelling a row changes its cache key and which image is cached as w. A swap of
w and l anywhere between the table and the cached latents fails here. The toy model's VAE is a
trained one, so decoding a latent gives back its image."""

import json

import pytest
import torch

from spoxl.data.cache import CachedDataset
from spoxl.data.images import to_pixels
from spoxl.data.pairs import PreferencePairDataset
from spoxl.models.loading import load_sdxl
from spoxl.sampling import decode_latents
from spoxl.toy import world


@pytest.fixture(scope="module")
def toy():
    return load_sdxl("toy")


def table(folder, label_0: float):
    red = world.Scene("red", "circle", "top left", "large", "black")
    blue = world.Scene("blue", "square", "bottom right", "large", "white")
    world.render(red).save(folder / "red.png")
    world.render(blue).save(folder / "blue.png")
    path = folder / f"pairs_{label_0:g}.jsonl"
    path.write_text(json.dumps({"jpg_0": "red.png", "jpg_1": "blue.png", "label_0": label_0,
                                "caption": red.caption()}) + "\n")
    return path, to_pixels(world.render(red)), to_pixels(world.render(blue))


def decode_error(toy, latents, pixels) -> float:
    return float((decode_latents(toy.vae, latents[None].float()) - pixels[None]).abs().mean())


def test_cached_winner_latents_decode_to_the_winner(tmp_path, toy):
    path, red, blue = table(tmp_path, 1.0)
    cached = CachedDataset(PreferencePairDataset(path, 64), toy, tmp_path / "cache")
    assert cached.build() == 1
    item = cached[0]
    assert decode_error(toy, item["latents_w"], red) < 0.05 < decode_error(toy, item["latents_w"], blue)
    assert decode_error(toy, item["latents_l"], blue) < 0.05 < decode_error(toy, item["latents_l"], red)


def test_relabelling_a_row_changes_its_key_and_swaps_the_cached_sides(tmp_path, toy):
    path1, red, blue = table(tmp_path, 1.0)
    path0, _, _ = table(tmp_path, 0.0)  # same images and caption, jpg_1 preferred now
    ds1, ds0 = PreferencePairDataset(path1, 64), PreferencePairDataset(path0, 64)
    assert ds1.cache_key(0) != ds0.cache_key(0)
    cache = tmp_path / "cache"
    CachedDataset(ds1, toy, cache).build()
    relabelled = CachedDataset(ds0, toy, cache)
    assert relabelled.build() == 1  # not served from the old label's entry
    item = relabelled[0]
    assert decode_error(toy, item["latents_w"], blue) < 0.05 < decode_error(toy, item["latents_w"], red)
