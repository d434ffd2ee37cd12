"""Real reward models from local paths (spoxl.models.rewards), on tiny randomly initialised models
of the same architectures saved in the same file formats: PickScore (a CLIPModel folder), the
LAION aesthetic predictor (a CLIP folder + the predictor's MLP .pth), HPSv2 (an open_clip ViT
CLIP in the released {"state_dict": ...} file) and ImageReward (BLIP's ViT + cross-attending BERT
+ MLP, in ImageReward.pt's keys). The expected scores are computed here with transformers and
torch directly, from the published definitions; HPSv2's and ImageReward's with plain-torch
forwards of the original architectures written from their official code (open_clip's CLIP,
BLIP's vit.py and med.py), not through the transformers classes spoxl maps them onto."""

import pytest
import torch
import torch.nn.functional as F

from spoxl.errors import SpoxlError
from spoxl.models.preference import StepAwareCLIP
from spoxl.preference_models import build_preference_model

PROMPTS = ["a red square", "a blue circle", "a green triangle"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    tiny = StepAwareCLIP.tiny(seed=3)
    tiny.clip.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)
    return folder


def _pixels(images, size):
    """CLIP preprocessing written out: bicubic resize of the shortest side, centre crop, CLIP mean/std."""
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)  # square inputs here
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return (((x + 1) / 2).clamp(0, 1) - mean) / std  # the official SPM clamps after the resize


def test_pickscore_is_logit_scale_times_cosine(clip_folder):
    from transformers import AutoTokenizer, CLIPModel

    scorer = build_preference_model("pickscore", path=str(clip_folder))
    images = torch.rand(3, 3, 48, 48) * 2 - 1
    clip, tok = CLIPModel.from_pretrained(clip_folder), AutoTokenizer.from_pretrained(clip_folder)
    with torch.no_grad():
        img = clip.get_image_features(pixel_values=_pixels(images, clip.config.vision_config.image_size))
        t = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        txt = clip.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask)
        img = img.pooler_output if hasattr(img, "pooler_output") else img
        txt = txt.pooler_output if hasattr(txt, "pooler_output") else txt
        expected = clip.logit_scale.exp() * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    torch.testing.assert_close(scorer.score(images, PROMPTS, 500), expected, rtol=1e-4, atol=1e-4)
    # the timestep is ignored, the prompt is not
    torch.testing.assert_close(scorer.score(images, PROMPTS, 0), scorer.score(images, PROMPTS, 900))
    assert not torch.allclose(scorer.score(images, PROMPTS, 0), scorer.score(images, PROMPTS[::-1], 0))


def test_laion_aesthetic_is_the_mlp_on_the_normalised_embedding(clip_folder, tmp_path):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(clip_folder)
    width = clip.config.projection_dim
    g = torch.Generator().manual_seed(0)
    shapes = {"0": (1024, width), "2": (128, 1024), "4": (64, 128), "6": (16, 64), "7": (1, 16)}
    state = {}
    for i, (out_f, in_f) in shapes.items():  # the published file's keys: layers.0/2/4/6/7
        state[f"layers.{i}.weight"] = torch.randn(out_f, in_f, generator=g) * 0.1
        state[f"layers.{i}.bias"] = torch.randn(out_f, generator=g) * 0.1
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    scorer = build_preference_model("laion_aesthetic", path=str(clip_folder),
                                    weights=str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"))  # fmt: skip
    images = torch.rand(3, 3, 48, 48) * 2 - 1
    with torch.no_grad():
        emb = clip.get_image_features(pixel_values=_pixels(images, clip.config.vision_config.image_size))
        h = F.normalize(emb.pooler_output if hasattr(emb, "pooler_output") else emb, dim=-1)
        for i in shapes:  # dropouts are identity at eval
            h = h @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(scorer.score(images, PROMPTS, 0), h.squeeze(-1), rtol=1e-4, atol=1e-4)
    # a head that does not fit is named; a missing file too
    del state["layers.7.bias"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(SpoxlError, match="does not fit the predictor head"):
        build_preference_model("laion_aesthetic", path=str(clip_folder), weights=str(tmp_path / "bad.pth"))
    with pytest.raises(SpoxlError, match="does not exist"):
        build_preference_model("laion_aesthetic", path=str(clip_folder), weights=str(tmp_path / "none.pth"))


def test_pathless_and_unknown_reward_models_are_one_line_errors():
    for kind in ("pickscore", "hpsv2", "hpsv2.1", "imagereward"):
        with pytest.raises(SpoxlError, match=f"'{kind}' needs a path"):
            build_preference_model(kind)
    with pytest.raises(SpoxlError, match="unknown preference model 'hps3'"):
        build_preference_model("hps3", path="/x")


def test_eval_scores_with_pickscore(clip_folder, tmp_path):
    import json

    from spoxl.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--model", "tiny", "--scorer", "pickscore", "--scorer-path", str(clip_folder),
                 "--steps", "2", "--num-prompts", "2", "--seeds", "1", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads((out / "eval.json").read_text())
    base = report["models"][0]
    assert base["model"] == "base" and report["scorer"] and abs(base["mean"]) < 200  # ~100 x cosine
    assert report["scorer"] == "pickscore" and len(report["per_prompt"]["base"]) == 2
