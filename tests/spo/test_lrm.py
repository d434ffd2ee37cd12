"""LPO's latent reward model (spoxl.models.lrm): its score against an independent computation of
the formula (lpo.md 1), the released weights' layout loading strictly without the up blocks, our
own layout round-tripping, and one-line errors for the wrong files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from spoxl.errors import SpoxlError
from spoxl.models.lrm import LatentRewardModel, feature_indices

PROMPTS = ["a red circle", "a green square on a white background", "a blue cat"]


def _lrm(components, seed=0):
    """An LRM from the tiny model with a random projection and a logit scale that is not the init
    (a score ignoring either would still pass with the defaults)."""
    model = LatentRewardModel.from_components(components)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.visual_projection.weight.copy_(torch.randn(model.visual_projection.weight.shape, generator=g))
        model.logit_scale.fill_(1.7)
    return model.eval()


def independent_score(components, projection, logit_scale, latents, prompts, t, guidance=7.5, text_projection=None):
    """The formula, computed with the FULL diffusers UNet of `components` (its own forward, hooks
    catching the down blocks' and mid block's outputs) and the text encoders called directly."""
    unet, te1, te2 = components.unet, components.text_encoder, components.text_encoder_2

    def ids(tok, texts):
        return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids  # fmt: skip

    texts = list(prompts) + [""] * len(prompts)
    n = latents.shape[0]
    side = 8 * unet.config.sample_size
    if te2 is not None:  # SDXL: penultimate layers; T = text_encoder_2's text_embeds, also the UNet's pooled input
        o1 = te1(ids(components.tokenizer, texts), output_hidden_states=True)
        o2 = te2(ids(components.tokenizer_2, texts), output_hidden_states=True)
        context = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        pooled = text = o2.text_embeds
        time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=torch.float32).expand(2 * n, -1)
        added = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    else:  # SD1.5: the last layer; T = the LRM's text projection of the pooled output
        o1 = te1(ids(components.tokenizer, texts))
        context, text, added = o1.last_hidden_state, o1.pooler_output @ text_projection.T, {}
    caught = {}
    hooks = [b.register_forward_hook(lambda m, i, o, k=k: caught.__setitem__(k, o)) for k, b in enumerate(unet.down_blocks)]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: caught.__setitem__("mid", o)))
    with torch.no_grad():
        unet(torch.cat([latents, latents]), torch.full((2 * n,), t), encoder_hidden_states=context, **added)
    for h in hooks:
        h.remove()
    # A down block returns (hidden, residuals); its last resnet's output is the last residual
    # before the downsampler's, i.e. residuals[-2] with a downsampler, residuals[-1] without.
    feats = []
    for k, block in enumerate(unet.down_blocks):
        res = caught[k][1]
        feats.append(res[-2] if block.downsamplers is not None else res[-1])
    feats = [f.mean(dim=(2, 3))[:n] for f in feats]
    mid = caught["mid"].mean(dim=(2, 3))
    feats.append(mid[n:] + guidance * (mid[:n] - mid[n:]))
    v = torch.cat(feats, dim=-1) @ projection.T
    txt = text[:n]
    cos = (v * txt).sum(-1) / (v.norm(dim=-1) * txt.norm(dim=-1))
    return logit_scale.exp() * cos


def test_lrm_score_equals_the_formula_computed_independently(tiny_components):
    model = _lrm(tiny_components)
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.score(latents, PROMPTS, 501)
    want = independent_score(tiny_components, model.visual_projection.weight, model.logit_scale.detach(), latents,
                             PROMPTS, 501)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the timestep and the prompt are inputs, not decoration
    with torch.no_grad():
        assert not torch.allclose(model.score(latents, PROMPTS, 901), got, atol=1e-4)
        assert not torch.allclose(model.score(latents, PROMPTS[::-1], 501), got, atol=1e-4)


def test_sd15_lrm_score_equals_the_formula_computed_independently():
    from spoxl.models.loading import load_sdxl

    comps = load_sdxl("tiny-sd15")
    model = _lrm(comps)
    with torch.no_grad():
        model.text_projection.weight.copy_(torch.randn(model.text_projection.weight.shape,
                                                       generator=torch.Generator().manual_seed(9)))  # fmt: skip
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.score(latents, PROMPTS, 301)
    want = independent_score(comps, model.visual_projection.weight, model.logit_scale.detach(), latents, PROMPTS, 301,
                             text_projection=model.text_projection.weight.detach())  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_feature_indices_are_the_official_ones_on_the_sdxl_unet():
    from spoxl.models.random_sdxl import bundled_config

    assert feature_indices(bundled_config("unet")) == [2, 5, 8]  # down_res[2], [5], [8] (lpo.md 1)
    sd15 = {"layers_per_block": 2, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
    assert feature_indices(sd15) == [2, 5, 8, 11]  # LRM-1.5's down_res[2], [5], [8], [11]


def _released_folder(tmp_path, components, projection, logit_scale):
    """A folder in the released LRM layout (casiatao/LRM): the FULL UNet (up blocks included) as
    diffusers saves it, both text encoders, and state_dict.pt as the official `save` writes it."""
    folder = tmp_path / "lrm_released"
    components.unet.save_pretrained(folder / "unet", safe_serialization=True)
    components.text_encoder.save_pretrained(folder / "text_encoder")
    components.text_encoder_2.save_pretrained(folder / "text_encoder_2")
    torch.save({"visual_projection": {"weight": projection.clone()}, "logit_scale": torch.tensor(logit_scale)},
               folder / "state_dict.pt")  # fmt: skip
    return folder


def test_released_layout_loads_strictly_and_never_keeps_the_up_blocks(tmp_path, tiny_components):
    reference = _lrm(tiny_components, seed=3)
    folder = _released_folder(tmp_path, tiny_components, reference.visual_projection.weight.detach(), 1.7)
    tokenizers = (tiny_components.tokenizer, tiny_components.tokenizer_2)
    model = LatentRewardModel.from_folder(folder, tokenizers=tokenizers)
    assert not any(name.startswith(("up_blocks", "conv_out", "conv_norm_out")) for name in model.unet.state_dict())
    assert all(p.device.type == "cpu" for p in model.parameters())  # nothing left on the meta device
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.score(latents, PROMPTS, 251), reference.score(latents, PROMPTS, 251))

    # a UNet key the architecture does not have: refused, named
    from safetensors.torch import load_file

    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    save_file({**state, "down_blocks.0.extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(SpoxlError, match="down_blocks.0.extra.weight"):
        LatentRewardModel.from_folder(folder, tokenizers=tokenizers)
    # a missing one: refused
    save_file({k: v for k, v in state.items() if k != "mid_block.resnets.0.conv1.weight"}, str(weights))
    with pytest.raises(SpoxlError, match="misses 1 UNet weights"):
        LatentRewardModel.from_folder(folder, tokenizers=tokenizers)
    save_file(state, str(weights))
    # a head of the wrong width, a head missing, no tokenizers anywhere
    torch.save({"visual_projection": {"weight": torch.zeros(3, 5)}, "logit_scale": torch.tensor(1.0)}, folder / "state_dict.pt")
    with pytest.raises(SpoxlError, match="projection"):
        LatentRewardModel.from_folder(folder, tokenizers=tokenizers)
    (folder / "state_dict.pt").unlink()
    with pytest.raises(SpoxlError, match="neither"):
        LatentRewardModel.from_folder(folder, tokenizers=tokenizers)
    with pytest.raises(SpoxlError, match="tokenizer"):
        LatentRewardModel.from_folder(folder)


def test_our_layout_round_trips(tmp_path, tiny_components):
    model = _lrm(tiny_components, seed=5)
    model.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    again = LatentRewardModel.from_folder(tmp_path / "ours")  # tokenizers saved with it
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(again.score(latents, PROMPTS[:2], 951), model.score(latents, PROMPTS[:2], 951))


def test_lrm_is_built_by_name_and_refuses_what_it_cannot_be(tiny_components):
    from spoxl.preference_models import build_preference_model

    with pytest.raises(SpoxlError, match="needs a path"):
        build_preference_model("lrm")
    fresh = build_preference_model("lrm", allow_untrained=True, components=tiny_components)
    assert fresh.input == "latents"
    with pytest.raises(SpoxlError, match="no unet/config.json"):
        build_preference_model("lrm", path="/nonexistent/lrm", components=tiny_components)


def test_a_fresh_lrm_trains_every_part_unless_its_text_encoders_are_frozen(tiny_components):
    """The loader freezes the policy's text encoders; the LRM's copies must be trainable (the
    official trains them), or the optimizer silently skips them."""
    model = LatentRewardModel.from_components(tiny_components)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in tiny_components.text_encoder.parameters())  # the policy's untouched
    frozen = LatentRewardModel.from_components(tiny_components, train_text_encoders=False)
    for encoder in (frozen.text_encoder, frozen.text_encoder_2):  # both, not just the first
        assert not any(p.requires_grad for p in encoder.parameters())
    assert all(p.requires_grad for p in frozen.unet.parameters()) and frozen.visual_projection.weight.requires_grad
    # The same freezing on a built model (an LRM loaded with --init, then --freeze-text-encoders)
    later = LatentRewardModel.from_components(tiny_components).freeze_text_encoders()
    assert [p.requires_grad for p in later.parameters()] == [p.requires_grad for p in frozen.parameters()]


def test_images_are_refused_with_a_one_line_error(tiny_components):
    model = LatentRewardModel.from_components(tiny_components)
    with pytest.raises(SpoxlError, match="4-channel latents, got 3"):
        model.score(torch.zeros(1, 3, 64, 64), ["a red circle"], 0)


def test_sd15_lrm_round_trips_with_its_text_projection(tmp_path):
    from spoxl.models.loading import load_sdxl

    comps = load_sdxl("tiny-sd15")
    model = _lrm(comps, seed=6)
    with torch.no_grad():
        model.text_projection.weight.mul_(0.5)
    model.save(tmp_path / "sd15")
    again = LatentRewardModel.from_folder(tmp_path / "sd15")
    torch.testing.assert_close(again.text_projection.weight, model.text_projection.weight)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(again.score(latents, PROMPTS[:2], 51), model.score(latents, PROMPTS[:2], 51))
