"""HPSv2 and ImageReward checkpoints (their released file layouts) load strictly into spoxl's
transformers-based scorers and score as the original architectures do.

The oracles below are plain-torch forwards of the ORIGINAL models written from the official code
(open_clip's CLIP: pre-LN blocks with a fused in_proj, class-token ln_post and [width, embed]
projections, argmax end-of-text pooling under a causal mask; BLIP's vit.py: fused qkv, eps 1e-6;
BLIP's med.py: a post-LN BERT whose every layer cross-attends to the image, -10000 masking),
reading the checkpoint's own keys. A wrong rename, a q/k/v split in the wrong order, an untransposed
projection, the wrong eps or the wrong pooling makes the scores differ."""

import math

import pytest
import torch
import torch.nn.functional as F

from spoxl.errors import SpoxlError
from spoxl.preference_models import build_preference_model
from spoxl.models.tiny import tiny_clip_tokenizer

PROMPTS = ["a red square", "a blue circle", "a green triangle"]
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def _pixels(images, size):
    x = F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)  # square inputs here
    return (((x + 1) / 2).clamp(0, 1) - MEAN) / STD  # clamped after the resize, as the official SPM / 8-bit PIL


def _rand(g, *shape, std=0.05, mean=0.0):
    return torch.randn(*shape, generator=g) * std + mean


def _attention(q, k, v, heads, mask=None):
    b, lq, d = q.shape
    split = lambda x: x.view(b, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, lq, d)


# ---------------------------------------------------------------------------------------------
# HPSv2: open_clip ViT CLIP

V_WIDTH, T_WIDTH, EMBED, PATCH, GRID = 160, 128, 48, 14, 2  # 2 heads of 80 / 2 of 64, as ViT-H-14's head widths


def open_clip_state(vocab: int, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    s = {"visual.conv1.weight": _rand(g, V_WIDTH, 3, PATCH, PATCH), "visual.class_embedding": _rand(g, V_WIDTH),
         "visual.positional_embedding": _rand(g, GRID * GRID + 1, V_WIDTH),
         "visual.proj": _rand(g, V_WIDTH, EMBED, std=0.1),
         "token_embedding.weight": _rand(g, vocab, T_WIDTH, std=0.5), "positional_embedding": _rand(g, 77, T_WIDTH),
         "text_projection": _rand(g, T_WIDTH, EMBED, std=0.1), "logit_scale": torch.tensor(math.log(100.0))}  # fmt: skip
    for ln, width in (("visual.ln_pre", V_WIDTH), ("visual.ln_post", V_WIDTH), ("ln_final", T_WIDTH)):
        s[f"{ln}.weight"], s[f"{ln}.bias"] = _rand(g, width, std=0.1, mean=1.0), _rand(g, width, std=0.1)
    for prefix, width, layers in (("visual.transformer", V_WIDTH, 2), ("transformer", T_WIDTH, 2)):
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}."
            for ln in ("ln_1", "ln_2"):
                s[p + ln + ".weight"], s[p + ln + ".bias"] = _rand(g, width, std=0.1, mean=1.0), _rand(g, width, std=0.1)
            s[p + "attn.in_proj_weight"], s[p + "attn.in_proj_bias"] = _rand(g, 3 * width, width, std=0.2), _rand(g, 3 * width)
            s[p + "attn.out_proj.weight"], s[p + "attn.out_proj.bias"] = _rand(g, width, width, std=0.1), _rand(g, width)
            s[p + "mlp.c_fc.weight"], s[p + "mlp.c_fc.bias"] = _rand(g, 4 * width, width, std=0.1), _rand(g, 4 * width)
            s[p + "mlp.c_proj.weight"], s[p + "mlp.c_proj.bias"] = _rand(g, width, 4 * width, std=0.1), _rand(g, width)
    return s


def _open_clip_tower(x, s, prefix, heads, mask=None):
    width = x.shape[-1]
    i = 0
    while f"{prefix}.resblocks.{i}.ln_1.weight" in s:
        p = lambda name: s[f"{prefix}.resblocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (width,), p("ln_1.weight"), p("ln_1.bias"))
        q, k, v = F.linear(h, p("attn.in_proj_weight"), p("attn.in_proj_bias")).chunk(3, dim=-1)
        x = x + F.linear(_attention(q, k, v, heads, mask), p("attn.out_proj.weight"), p("attn.out_proj.bias"))
        h = F.layer_norm(x, (width,), p("ln_2.weight"), p("ln_2.bias"))
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))), p("mlp.c_proj.weight"), p("mlp.c_proj.bias"))
        i += 1
    return x


def hps_oracle(s, pixels, ids):
    """open_clip CLIP.forward -> normalised features -> image_features @ text_features.T (diagonal)."""
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + s["visual.positional_embedding"]
    x = F.layer_norm(x, (V_WIDTH,), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"])
    x = _open_clip_tower(x, s, "visual.transformer", V_WIDTH // 80)
    img = F.layer_norm(x[:, 0], (V_WIDTH,), s["visual.ln_post.weight"], s["visual.ln_post.bias"]) @ s["visual.proj"]
    t = s["token_embedding.weight"][ids] + s["positional_embedding"]
    causal = torch.full((77, 77), float("-inf")).triu(1)
    t = _open_clip_tower(t, s, "transformer", T_WIDTH // 64, causal)
    t = F.layer_norm(t, (T_WIDTH,), s["ln_final.weight"], s["ln_final.bias"])
    txt = t[torch.arange(t.shape[0]), ids.argmax(-1)] @ s["text_projection"]
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hps")
    tok = tiny_clip_tokenizer()
    tok.save_pretrained(folder / "tokenizer")
    state = open_clip_state(len(tok))
    torch.save({"state_dict": state}, folder / "HPS_v2.1_compressed.pt")  # the released layout
    return folder, state, tok


def test_hpsv2_scores_as_open_clip_does(hps_files):
    folder, state, tok = hps_files
    scorer = build_preference_model("hpsv2.1", path=str(folder / "tokenizer"), weights=str(folder / "HPS_v2.1_compressed.pt"))
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    expected = 100 * hps_oracle(state, _pixels(images, GRID * PATCH), ids)
    got = scorer.score(images, PROMPTS, 500)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    assert expected.std() > 1.0  # distinct scores: a real comparison, not three equal numbers
    # the prompt matters, the timestep does not
    assert not torch.allclose(scorer.score(images, PROMPTS[::-1], 500), got)
    torch.testing.assert_close(scorer.score(images, PROMPTS, 0), got)


def test_hpsv2_checkpoint_errors_name_the_problem(hps_files, tmp_path):
    folder, state, _ = hps_files
    tok = str(folder / "tokenizer")
    bad = dict(state, **{"visual.transformer.resblocks.0.attn.qkv.weight": state["visual.proj"]})
    torch.save({"state_dict": bad}, tmp_path / "bad.pt")
    with pytest.raises(SpoxlError, match="key visual.transformer.resblocks.0.attn.qkv.weight"):
        build_preference_model("hpsv2", path=tok, weights=str(tmp_path / "bad.pt"))
    missing = {k: v for k, v in state.items() if k != "ln_final.bias"}
    torch.save({"state_dict": missing}, tmp_path / "missing.pt")
    with pytest.raises(SpoxlError, match="does not load strictly.*text_model.final_layer_norm.bias"):
        build_preference_model("hpsv2", path=tok, weights=str(tmp_path / "missing.pt"))
    with pytest.raises(SpoxlError, match="hpsv2 needs its checkpoint"):
        build_preference_model("hpsv2", path=tok)
    with pytest.raises(SpoxlError, match="does not exist"):
        build_preference_model("hpsv2", path=tok, weights=str(tmp_path / "nope.pt"))
    with pytest.raises(SpoxlError, match="no CLIP tokenizer"):
        build_preference_model("hpsv2", path=str(tmp_path), weights=str(folder / "HPS_v2.1_compressed.pt"))


# ---------------------------------------------------------------------------------------------
# ImageReward: BLIP ViT + med BERT + MLP

IR_V, IR_T, IR_PATCH, IR_GRID, IR_POS = 128, 64, 16, 2, 40
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "square", "blue", "circle", "green", "triangle"]


def image_reward_state(vocab: int, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    s = {v + "cls_token": _rand(g, 1, 1, IR_V), v + "pos_embed": _rand(g, 1, IR_GRID * IR_GRID + 1, IR_V),
         v + "patch_embed.proj.weight": _rand(g, IR_V, 3, IR_PATCH, IR_PATCH), v + "patch_embed.proj.bias": _rand(g, IR_V),
         v + "norm.weight": _rand(g, IR_V, std=0.1, mean=1.0), v + "norm.bias": _rand(g, IR_V, std=0.1),
         t + "embeddings.word_embeddings.weight": _rand(g, vocab, IR_T, std=0.5),
         t + "embeddings.position_embeddings.weight": _rand(g, IR_POS, IR_T, std=0.5),
         t + "embeddings.LayerNorm.weight": _rand(g, IR_T, std=0.1, mean=1.0), t + "embeddings.LayerNorm.bias": _rand(g, IR_T, std=0.1),
         t + "embeddings.position_ids": torch.arange(IR_POS).unsqueeze(0),  # older transformers saved this buffer
         "blip.vision_proj.weight": _rand(g, 32, IR_V), "blip.vision_proj.bias": _rand(g, 32),
         "blip.text_proj.weight": _rand(g, 32, IR_T), "blip.text_proj.bias": _rand(g, 32)}  # fmt: skip
    for i in range(2):
        p = f"{v}blocks.{i}."
        for ln in ("norm1", "norm2"):
            s[p + ln + ".weight"], s[p + ln + ".bias"] = _rand(g, IR_V, std=0.1, mean=1.0), _rand(g, IR_V, std=0.1)
        s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"] = _rand(g, 3 * IR_V, IR_V, std=0.2), _rand(g, 3 * IR_V)
        s[p + "attn.proj.weight"], s[p + "attn.proj.bias"] = _rand(g, IR_V, IR_V, std=0.1), _rand(g, IR_V)
        s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"] = _rand(g, 4 * IR_V, IR_V, std=0.1), _rand(g, 4 * IR_V)
        s[p + "mlp.fc2.weight"], s[p + "mlp.fc2.bias"] = _rand(g, IR_V, 4 * IR_V, std=0.1), _rand(g, IR_V)
    for i in range(2):
        p = f"{t}encoder.layer.{i}."
        for att, kv_width in (("attention", IR_T), ("crossattention", IR_V)):
            s[p + att + ".self.query.weight"], s[p + att + ".self.query.bias"] = _rand(g, IR_T, IR_T, std=0.3), _rand(g, IR_T)
            for name in ("key", "value"):
                s[p + f"{att}.self.{name}.weight"] = _rand(g, IR_T, kv_width, std=0.3)
                s[p + f"{att}.self.{name}.bias"] = _rand(g, IR_T)
            s[p + att + ".output.dense.weight"], s[p + att + ".output.dense.bias"] = _rand(g, IR_T, IR_T, std=0.1), _rand(g, IR_T)
            s[p + att + ".output.LayerNorm.weight"] = _rand(g, IR_T, std=0.1, mean=1.0)
            s[p + att + ".output.LayerNorm.bias"] = _rand(g, IR_T, std=0.1)
        s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"] = _rand(g, 4 * IR_T, IR_T, std=0.1), _rand(g, 4 * IR_T)
        s[p + "output.dense.weight"], s[p + "output.dense.bias"] = _rand(g, IR_T, 4 * IR_T, std=0.1), _rand(g, IR_T)
        s[p + "output.LayerNorm.weight"], s[p + "output.LayerNorm.bias"] = _rand(g, IR_T, std=0.1, mean=1.0), _rand(g, IR_T, std=0.1)
    for k, (o, i) in {"0": (1024, IR_T), "2": (128, 1024), "4": (64, 128), "6": (16, 64), "7": (1, 16)}.items():
        s[f"mlp.layers.{k}.weight"], s[f"mlp.layers.{k}.bias"] = _rand(g, o, i, std=1 / math.sqrt(i)), _rand(g, o, std=0.1)
    return s


def image_reward_oracle(s, pixels, ids, mask):
    """ImageReward.score: BLIP ViT (vit.py), the med.py BERT in multimodal mode, CLS -> MLP, standardised."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=IR_PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([s[v + "cls_token"].expand(x.shape[0], -1, -1), x], 1) + s[v + "pos_embed"]
    for i in range(2):
        p = lambda n: s[f"{v}blocks.{i}.{n}"]  # noqa: E731
        h = F.layer_norm(x, (IR_V,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        q, k, vv = F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")).chunk(3, dim=-1)  # reshape(B, N, 3, H, hd)
        x = x + F.linear(_attention(q, k, vv, IR_V // 64), p("attn.proj.weight"), p("attn.proj.bias"))
        h = F.layer_norm(x, (IR_V,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias"))
    image = F.layer_norm(x, (IR_V,), s[v + "norm.weight"], s[v + "norm.bias"], eps=1e-6)

    def ln(h, name):
        return F.layer_norm(h, (IR_T,), s[name + ".weight"], s[name + ".bias"], eps=1e-12)

    h = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    h = ln(h, t + "embeddings.LayerNorm")
    text_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(2):
        p = f"{t}encoder.layer.{i}."
        for att, kv, m in (("attention", h, text_mask), ("crossattention", image, None)):
            lin = lambda n, x_: F.linear(x_, s[p + f"{att}.{n}.weight"], s[p + f"{att}.{n}.bias"])  # noqa: E731
            ctx = _attention(lin("self.query", h), lin("self.key", kv), lin("self.value", kv), IR_T // 64, m)
            h = ln(lin("output.dense", ctx) + h, p + att + ".output.LayerNorm")
        ff = F.linear(F.gelu(F.linear(h, s[p + "intermediate.dense.weight"], s[p + "intermediate.dense.bias"])),
                      s[p + "output.dense.weight"], s[p + "output.dense.bias"])  # fmt: skip
        h = ln(ff + h, p + "output.LayerNorm")
    r = h[:, 0]
    for k in ("0", "2", "4", "6", "7"):
        r = F.linear(r, s[f"mlp.layers.{k}.weight"], s[f"mlp.layers.{k}.bias"])
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture(scope="module")
def ir_files(tmp_path_factory):
    from transformers import BertTokenizer

    folder = tmp_path_factory.mktemp("imagereward")
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"))
    tok.save_pretrained(folder / "tokenizer")
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    state = image_reward_state(len(tok))
    torch.save(state, folder / "ImageReward.pt")  # the released file: a bare state dict
    return folder, state, tok


def test_imagereward_scores_as_the_official_model_does(ir_files):
    folder, state, tok = ir_files
    scorer = build_preference_model("imagereward", path=str(folder / "tokenizer"), weights=str(folder / "ImageReward.pt"))
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert enc.input_ids[0, 0] == tok.cls_token_id and enc.attention_mask[0, -1] == 0  # [CLS] first; padded
    expected = image_reward_oracle(state, _pixels(images, IR_GRID * IR_PATCH), enc.input_ids, enc.attention_mask)
    got = scorer.score(images, PROMPTS, 500)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert expected.std() > 0.05
    assert not torch.allclose(scorer.score(images, PROMPTS[::-1], 500), got)


def test_imagereward_reads_the_med_config_beside_the_checkpoint(ir_files, tmp_path):
    """med_config.json's layer-norm eps reaches the text encoder (a wrong eps changes the scores)."""
    import json
    import shutil

    folder, state, _ = ir_files
    shutil.copy(folder / "ImageReward.pt", tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps({"layer_norm_eps": 0.5, "hidden_act": "gelu"}))
    scorer = build_preference_model("imagereward", path=str(folder / "tokenizer"), weights=str(tmp_path / "ImageReward.pt"))
    assert scorer.net.text.config.layer_norm_eps == 0.5


def test_imagereward_checkpoint_errors_name_the_problem(ir_files, tmp_path):
    folder, state, _ = ir_files
    tok = str(folder / "tokenizer")
    torch.save(dict(state, **{"blip.text_decoder.cls.bias": torch.zeros(3)}), tmp_path / "extra.pt")
    with pytest.raises(SpoxlError, match="does not load strictly.*text_decoder|key blip.text_decoder"):
        build_preference_model("imagereward", path=tok, weights=str(tmp_path / "extra.pt"))
    torch.save({k: v for k, v in state.items() if not k.startswith("mlp.layers.7")}, tmp_path / "nohead.pt")
    with pytest.raises(SpoxlError, match="does not load strictly.*head.7"):
        build_preference_model("imagereward", path=tok, weights=str(tmp_path / "nohead.pt"))
    with pytest.raises(SpoxlError, match="no BERT tokenizer"):
        build_preference_model("imagereward", path=str(tmp_path), weights=str(folder / "ImageReward.pt"))
