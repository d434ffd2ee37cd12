"""data.caption_dropout (the official Diffusion-DPO's proportion_empty_prompts): the offline
methods' text embeddings of a drawn share of rows become the empty caption's, drawn after the
noise and timesteps so that everything else about a step is unchanged, reproducibly per seed."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from inprocess import make  # noqa: E402

from spoxl.config import load_config  # noqa: E402
from spoxl.errors import SpoxlError  # noqa: E402
from spoxl.methods._offline import encode_and_noise  # noqa: E402
from spoxl.models.text import encode_prompts  # noqa: E402

SETS = ["data.synthetic_size=32", "train.micro_batch_size=16"]


def step_inputs(tmp_path, dropout: float, seed: int = 0):
    ctx, objective = make(tmp_path, [*SETS, f"data.caption_dropout={dropout}", f"run.seed={seed}"])
    batch = next(iter(objective.micro_batches(ctx.view)))
    encoded, noise, t, _ = encode_and_noise(ctx.view, batch, objective.noise)
    empty = encode_prompts(ctx.components, [""])
    dropped = [bool(torch.equal(encoded["prompt_embeds"][i], empty.embeds[0].to(encoded["prompt_embeds"].dtype))
                    and torch.equal(encoded["pooled_prompt_embeds"][i], empty.pooled[0].to(encoded["pooled_prompt_embeds"].dtype)))
               for i in range(len(t))]  # fmt: skip
    return encoded, noise, t, dropped


def test_dropout_replaces_a_drawn_share_of_captions_and_nothing_else(tmp_path):
    plain, noise0, t0, none_dropped = step_inputs(tmp_path / "0", 0.0)
    half, noise5, t5, some_dropped = step_inputs(tmp_path / "5", 0.5)
    every, _, _, all_dropped = step_inputs(tmp_path / "1", 1.0)
    assert not any(none_dropped) and all(all_dropped)
    assert 0 < sum(some_dropped) < len(some_dropped)  # 16 rows at 0.5
    # the noise and timesteps are the same draws with and without dropout (the mask comes last),
    # and the rows kept keep their own caption's embeddings
    assert torch.equal(noise0, noise5) and torch.equal(t0, t5)
    for i, dropped in enumerate(some_dropped):
        if not dropped:
            assert torch.equal(half["prompt_embeds"][i], plain["prompt_embeds"][i])
    # the latents are untouched
    assert torch.equal(half["latents"], plain["latents"])
    # reproducible for a seed, different for another
    assert step_inputs(tmp_path / "again", 0.5)[3] == some_dropped
    assert step_inputs(tmp_path / "seed1", 0.5, seed=1)[3] != some_dropped


def test_dropout_out_of_range_is_a_config_error():
    with pytest.raises(SpoxlError, match="data.caption_dropout must be in"):
        load_config(None, ["data.caption_dropout=1.5"])
