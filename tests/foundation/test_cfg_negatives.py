"""SDXL classifier-free guidance negatives as diffusers makes them: zeros (sequence and pooled)
when the model's force_zeros_for_empty_prompt is set (SDXL base), the encoded "" otherwise; the
flag is read from model_index.json (absent = true, as diffusers)."""

import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from spoxl.models.loading import load_sdxl
from spoxl.models.text import encode_with_negative, negative_embeds
from spoxl.models.tiny import build_tiny_sdxl

PROMPTS = ["a red square", "a blue circle"]


@pytest.mark.parametrize("force_zeros", [True, False])
def test_negatives_match_diffusers_encode_prompt(force_zeros):
    comps = build_tiny_sdxl(0)
    comps.force_zeros_for_empty_prompt = force_zeros
    pipe = StableDiffusionXLPipeline(vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
                                     tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.unet,
                                     scheduler=comps.scheduler, force_zeros_for_empty_prompt=force_zeros)  # fmt: skip
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
        pos, ours = encode_with_negative(comps, PROMPTS)
    torch.testing.assert_close(pos.embeds, embeds)
    torch.testing.assert_close(pos.pooled, pooled)
    torch.testing.assert_close(ours.embeds, neg)
    torch.testing.assert_close(ours.pooled, neg_pooled)
    assert bool((ours.embeds == 0).all()) == force_zeros  # zeros exactly when asked
    assert len(negative_embeds(comps, 3)) == 3


def test_the_flag_is_read_from_model_index(tmp_path):
    comps = build_tiny_sdxl(0)
    comps.save_pretrained(tmp_path / "m")
    index_path = tmp_path / "m" / "model_index.json"
    assert json.loads(index_path.read_text())["force_zeros_for_empty_prompt"] is False  # written as it is
    assert load_sdxl(tmp_path / "m").force_zeros_for_empty_prompt is False
    index = json.loads(index_path.read_text())
    del index["force_zeros_for_empty_prompt"]  # absent: true, as diffusers' SDXL pipeline
    index_path.write_text(json.dumps(index))
    assert load_sdxl(tmp_path / "m").force_zeros_for_empty_prompt is True
    assert load_sdxl("toy").force_zeros_for_empty_prompt is False  # trained with "" as its negative
    assert load_sdxl("tiny").force_zeros_for_empty_prompt is False
