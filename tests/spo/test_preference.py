"""Step-aware preference models: the SPO CLIP is the untimed CLIP at init; programmatic scorers."""

import math

import pytest
import torch

from spoxl.errors import SpoxlError
from spoxl.models.preference import StepAwareCLIP, timestep_embedding
from spoxl.preference_models import build_preference_model
from spoxl.models.scorers import BrightnessScorer, ColourScorer
from spoxl.spo.pool_sampler import pair_gap
from spo_threads import one_thread  # noqa: F401  (autouse fixture)

PROMPTS = ["a red circle", "a blue square", "a green cat"]


@pytest.fixture(scope="module")
def clip_model():
    return StepAwareCLIP.tiny(seed=0)


def test_adaln_is_identity_at_init(clip_model):
    images = torch.rand(3, 3, 40, 48) * 2 - 1  # non-square: resize + centre crop
    untimed = clip_model.untimed_score(images, PROMPTS)
    for t in (0, 251, 999):
        timed = clip_model.score(images, PROMPTS, t)
        torch.testing.assert_close(timed, untimed, rtol=1e-5, atol=1e-5)
    timed = clip_model.score(images, PROMPTS, torch.tensor([1.0, 500.0, 951.0]))
    torch.testing.assert_close(timed, untimed, rtol=1e-5, atol=1e-5)


def test_init_values_and_time_dependence():
    model = StepAwareCLIP.tiny(seed=1)
    width = model.clip.vision_model.config.hidden_size
    lin = model.blocks[0].modulation[1]
    assert torch.count_nonzero(lin.weight) == 0
    bias = lin.bias.view(6, width)
    assert torch.all(bias[[2, 5]] == 1) and torch.all(bias[[0, 1, 3, 4]] == 0)  # gates 1, rest 0
    assert torch.count_nonzero(model.final_modulation[1].weight) == 0
    assert torch.count_nonzero(model.final_modulation[1].bias) == 0
    # Once the modulation is trained (here: perturbed), the score depends on t: the test above can fail.
    with torch.no_grad():
        for block in model.blocks:
            block.modulation[1].weight.normal_(std=0.5)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    s0 = model.score(images, PROMPTS[:2], 0)
    s1 = model.score(images, PROMPTS[:2], 900)
    assert not torch.allclose(s0, s1, atol=1e-3)


def test_timestep_embedding_is_dit_sinusoid():
    t = torch.tensor([0.0, 10.0])
    emb = timestep_embedding(t, 256, 10000)
    assert emb.shape == (2, 256)
    freq = math.exp(-math.log(10000) * 3 / 128)
    assert emb[1, 3].item() == pytest.approx(math.cos(10 * freq), abs=1e-6)
    assert emb[1, 128 + 3].item() == pytest.approx(math.sin(10 * freq), abs=1e-6)


def test_save_load_round_trip(tmp_path):
    model = StepAwareCLIP.tiny(seed=2)
    with torch.no_grad():
        model.final_modulation[1].bias.normal_()
    model.save(tmp_path / "spm.safetensors")
    other = build_preference_model("clip", path="tiny", weights=str(tmp_path / "spm.safetensors"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(other.score(images, PROMPTS[:2], 300), model.score(images, PROMPTS[:2], 300))
    with pytest.raises(SpoxlError, match="do not exist"):
        other.load(tmp_path / "missing.safetensors")
    # a torch file in neither layout is refused with the key that does not fit
    torch.save({"vision_model.embeddings.class_embedding": torch.zeros(4)}, tmp_path / "odd.bin")
    with pytest.raises(SpoxlError, match="do not match the model"):
        other.load(tmp_path / "odd.bin")


def _official_layout(model: StepAwareCLIP) -> dict:
    """The official SPO code's state dict of the same weights, written out here from its module
    names (official-differences.md 2), independently of spoxl's loader: the CLIP under `model.`,
    the time embedder as `model.t_embedder`, the per-layer adaLN inside the vision encoder layers,
    the final one on the vision model."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("clip."):
            out["model." + key[len("clip."):]] = value.clone()
        elif key.startswith("time_embed."):
            out["model.t_embedder." + key[len("time_embed."):]] = value.clone()
        elif key.startswith("blocks."):
            _, n, _, rest = key.split(".", 3)  # blocks.N.modulation.REST
            out[f"model.vision_model.encoder.layers.{n}.adaLN_modulation.{rest}"] = value.clone()
        elif key.startswith("final_modulation."):
            out["model.vision_model.adaLN_modulation." + key[len("final_modulation."):]] = value.clone()
        else:
            raise AssertionError(key)
    return out


def test_official_spm_release_loads_by_key_rename(tmp_path):
    """An official *_step-aware_preference_model.bin (a torch state dict in the official names) loads
    strictly and scores exactly as the model it was written from, time conditioning included."""
    source = StepAwareCLIP.tiny(seed=5)
    with torch.no_grad():  # non-zero adaLN everywhere, so a block or chunk mixed up changes the scores
        for name, p in source.named_parameters():
            if not name.startswith("clip."):
                p.normal_(std=0.05)
    state = _official_layout(source)
    state["model.text_model.embeddings.position_ids"] = torch.arange(77)[None]  # dropped, as the official run has it
    official = tmp_path / "sdxl_step-aware_preference_model.bin"
    torch.save(state, official)
    loaded = build_preference_model("clip", path="tiny", weights=str(official))  # another seed's weights before
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    for t in (0, 501, 951):
        torch.testing.assert_close(loaded.score(images, PROMPTS[:3], t), source.score(images, PROMPTS[:3], t))
    assert not torch.allclose(loaded.score(images, PROMPTS[:3], 0), loaded.score(images, PROMPTS[:3], 951))
    # strict: a missing key or a foreign one is named
    del state["model.vision_model.adaLN_modulation.1.weight"]
    torch.save(state, official)
    with pytest.raises(SpoxlError, match="missing key final_modulation.1.weight"):
        loaded.load(official)
    state = _official_layout(source)
    state["model.extra_head.weight"] = torch.zeros(2)
    torch.save(state, official)
    with pytest.raises(SpoxlError, match="unexpected key clip.extra_head.weight"):
        loaded.load(official)
    # a pickled object, not a state dict, is refused without being unpickled
    torch.save({"model": torch.nn.Linear(2, 2)}, official)
    with pytest.raises(SpoxlError, match="not a torch state dict"):
        loaded.load(official)


def test_colour_scorer_prefers_the_named_colour():
    red = torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    blue = torch.tensor([-1.0, -1.0, 1.0]).view(1, 3, 1, 1).expand(1, 3, 8, 8)
    scorer = ColourScorer(scale=100)
    images = torch.cat([red, blue])
    s_red = scorer.score(images, ["a red circle"] * 2, 0)
    s_blue = scorer.score(images, ["a blue circle"] * 2, 0)
    assert s_red[0] == pytest.approx(100.0) and s_red[1] < s_red[0]
    assert s_blue[1] == pytest.approx(100.0) and s_blue[0] < s_blue[1]
    with pytest.raises(SpoxlError, match="names no colour"):
        scorer.score(images, ["a cat", "a dog"], 0)
    with pytest.raises(SpoxlError, match="2 inputs but 1 prompts"):
        scorer.score(images, ["a red cat"], 0)


def test_brightness_scorer_sign():
    dark, bright = -torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    s = BrightnessScorer(scale=10).score(torch.cat([dark, bright]), ["a cat", "a cat"], [0, 0])
    assert s[1] > s[0]
    s = BrightnessScorer(scale=10).score(torch.cat([dark, bright]), ["a dark night", "a dark night"], [0, 0])
    assert s[0] > s[1]


def test_softmax_gap_matches_the_documented_scale():
    # scorers.py: gap = tanh((s_w - s_l) / 2); tau = 0.4 <=> a score difference of 2 atanh(0.4).
    diff = torch.tensor([0.1, 0.847, 2.0])
    torch.testing.assert_close(pair_gap(diff, torch.zeros(3)), torch.tanh(diff / 2))
    assert pair_gap(torch.tensor(2 * math.atanh(0.4) + 1e-3), torch.tensor(0.0)) > 0.4


def test_unknown_preference_model():
    with pytest.raises(SpoxlError, match="unknown preference model"):
        build_preference_model("pickscore_v9")
    with pytest.raises(SpoxlError, match="needs a path"):
        build_preference_model("clip", path=None)
    # an untrained step-aware CLIP ignores t: only on request (the SPM trainer starts from it)
    with pytest.raises(SpoxlError, match="has no step-aware weights"):
        build_preference_model("clip", path="tiny")
    assert isinstance(build_preference_model("clip", path="tiny", allow_untrained=True), StepAwareCLIP)
    with pytest.raises(SpoxlError, match="has no config.json"):
        build_preference_model("clip", path="/nonexistent/clip", allow_untrained=True)
