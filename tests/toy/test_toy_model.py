"""The shipped pretrained toy model: it loads like a real SDXL folder, draws recognisably but
imperfectly on held-out captions, and its predictions at a moderate t keep the scorers' ranking."""

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from spoxl.cli import main
from spoxl.errors import SpoxlError
from spoxl.evaluation import score_images
from spoxl.imaging import sample_images
from spoxl.models.loading import check_sdxl_folder, load_sdxl
from spoxl.models.text import encode_prompts, make_time_ids
from spoxl.sampling import add_noise, alpha_bar, split_prediction, unet_eps, decode_latents
from spoxl.toy import world
from spoxl.toy.model import WEIGHTS_DIR, toy_unet_config
from spoxl.toy.scorers import ToyScorer


@pytest.fixture(scope="module")
def toy():
    return load_sdxl("toy")


def test_shipped_folder_is_a_diffusers_sdxl_folder_loaded_by_the_real_path(toy):
    check_sdxl_folder(WEIGHTS_DIR)  # the checks a real checkpoint folder passes
    again = load_sdxl(str(WEIGHTS_DIR))
    for a, b in zip(toy.unet.state_dict().values(), again.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert dict(toy.unet.config)["block_out_channels"] == list(toy_unet_config()["block_out_channels"])
    assert toy.unet.config.addition_embed_type == "text_time"
    # CFG negatives: the toy model learned "" as its unconditional caption, and says so
    assert json.loads((WEIGHTS_DIR / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is False
    size = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*") if f.is_file())
    assert size < 30 * 2**20
    info = json.loads((WEIGHTS_DIR / "pretrain.json").read_text())
    assert info["cpu_seconds_total"] > 0 and info["unet_steps"] > 0  # the cost of reproducing it is recorded
    # every word of the grammar is one token
    assert toy.tokenizer.tokenize("a small magenta triangle") == ["a</w>", "small</w>", "magenta</w>", "triangle</w>"]


def test_pipeline_loads_the_shipped_folder():
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(WEIGHTS_DIR, local_files_only=True)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == world.RESOLUTION


@pytest.fixture(scope="module")
def held_out_samples(toy):
    torch.manual_seed(0)
    prompts = world.held_out_captions()
    batch = [p for p in prompts for _ in range(2)]
    with torch.no_grad():
        images = sample_images(toy, batch, steps=20, cfg_scale=5.0, eta=0.0, seed=100_000, batch_size=144)
    return batch, images


def test_held_out_samples_are_recognisable_but_imperfect(held_out_samples):
    batch, images = held_out_samples
    scores, attributes, correct = score_images(ToyScorer(), images, batch)
    acc = {k: float(v.float().mean()) for k, v in correct.items()}
    # The quality band the toy world is built for (docs/toy_world.md, measured on these fixed seeds):
    # the colour is right about half the time, shape and position less reliably: room to align.
    assert 0.4 <= acc["colour"] <= 0.8, acc
    assert 0.2 <= acc["position"] <= 0.8, acc
    assert 0.3 <= acc["shape"] <= 0.9, acc
    # the mean fidelity is far below an exact rendering's (~93)
    assert 15 < float(scores.mean()) < 75, float(scores.mean())


def test_scorers_rank_exact_above_wrong_on_the_models_predicted_x0_at_moderate_t(toy):
    """The step-aware use: render an exact scene and a one-attribute-wrong one, noise both to
    t = 400 with the same noise, let the toy UNet predict x0 under the exact caption, decode, score."""
    rng = random.Random(0)
    scenes = rng.sample(world.held_out_scenes(), 12)
    t = 400
    a = alpha_bar(toy.scheduler, t)
    scorer = ToyScorer("fidelity")
    for attr, options in (("colour", world.COLOURS), ("shape", world.SHAPES), ("position", world.POSITIONS)):
        exact, wrong = [], []
        for s in scenes:
            exact.append(s)
            wrong.append(dataclasses.replace(s, **{attr: rng.choice([o for o in options if o != getattr(s, attr)])}))
        captions = [s.caption() for s in exact]

        def predicted_x0(scenes_):
            px = torch.stack([torch.from_numpy(np.asarray(world.render(s)).copy()).permute(2, 0, 1) for s in scenes_])
            with torch.no_grad():
                lat = toy.vae.encode(px.float() / 127.5 - 1).latent_dist.mode() * toy.vae.config.scaling_factor
                noise = torch.randn(lat.shape, generator=torch.Generator().manual_seed(1))
                x_t = add_noise(lat, noise, a)
                emb = encode_prompts(toy, captions)
                out = unet_eps(toy.unet, x_t, t, emb.embeds, emb.pooled, make_time_ids(len(scenes_), (64, 64)))
                x0, _ = split_prediction(out, x_t, a)
                return decode_latents(toy.vae, x0)

        diff = scorer.score(predicted_x0(exact), captions, t) - scorer.score(predicted_x0(wrong), captions, t)
        assert diff.mean() > 2 and (diff > 0).float().mean() >= 0.75, (attr, diff)


def test_toy_works_where_tiny_does(tmp_path):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", "toy", "--prompt", "a large red circle in the center on a white background",
                 "--steps", "4", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    folder = tmp_path / "toy_copy"
    assert main(["toy", "export", str(folder)]) == 0
    check_sdxl_folder(folder)
    assert main(["toy", "export", str(folder)]) == 2  # never over a non-empty folder


def test_missing_weights_are_a_one_line_error(monkeypatch, tmp_path):
    import spoxl.paths

    monkeypatch.setattr(spoxl.paths, "TOY_WEIGHTS_DIR", tmp_path / "nowhere")
    with pytest.raises(SpoxlError, match="toy pretrain"):
        load_sdxl("toy")
