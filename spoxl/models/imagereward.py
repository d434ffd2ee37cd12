"""ImageReward (Xu et al. 2023) as a reward model, loaded from the released ImageReward.pt into
transformers' BLIP parts: no `image-reward` package at run time (it pins timm 0.6 and fairscale,
and downloads its tokenizer and config from the hub).

The official scorer (THUDM ImageReward, ImageReward.score): the prompt tokenised by BLIP's
BERT tokenizer (bert-base-uncased plus [DEC] and [ENC]; padding to max_length 35, truncation),
the image CLIP-preprocessed (bicubic resize to 224, centre crop, OpenAI mean/std), then
    image_embeds = blip.visual_encoder(image)                       (a ViT, all tokens)
    h = blip.text_encoder(ids, mask, encoder_hidden_states=image_embeds).last_hidden_state[:, 0]
    reward = (mlp(h) - 0.16717362830052426) / 1.0333394966054072
with the text encoder a BERT whose every layer cross-attends to the image (BLIP's med.py), and mlp
the 768-1024-128-64-16-1 head (Linear layers 0, 2, 4, 6, 7, dropouts between). spoxl reports
`scale` x reward (default 1: ImageReward's own standardised scale).

Key map (a rename; transformers' BLIP text model is a port of BLIP's med.py):
  blip.visual_encoder.cls_token / pos_embed / patch_embed.proj
      -> vision.embeddings.class_embedding / .position_embedding / .patch_embedding
  blip.visual_encoder.blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, .norm
      -> vision.encoder.layers.N.{layer_norm1, self_attn.qkv, self_attn.projection, layer_norm2,
         mlp.fc1, mlp.fc2}, vision.post_layernorm
  blip.text_encoder.X -> text.X (same names); mlp.layers.K -> head.K
  blip.vision_proj, blip.text_proj (contrastive heads ImageReward does not use) are dropped.
Sizes come from the tensors' shapes; heads from the 64-wide heads of BLIP's ViTs and BERT; layer
norm eps 1e-6 (BLIP's ViT) and the med config's (1e-12, BERT's) for the text encoder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from spoxl.errors import SpoxlError
from spoxl.models.preference_io import check_inputs, clip_pixel_values, load_strict

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35
HEAD_WIDTH = 64
_VISION_TOP = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}  # fmt: skip
_VISION_BLOCK = re.compile(r"blocks\.(\d+)\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)")
_VISION_PARTS = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
                 "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}  # fmt: skip
_DROPPED = ("blip.vision_proj.", "blip.text_proj.")


def mapped_state(state: dict, file="the checkpoint") -> dict:
    """ImageReward.pt keys -> {"vision.*", "text.*", "head.*"} (see the module docstring)."""
    out = {}
    for key, value in state.items():
        if key.startswith(_DROPPED) or key.endswith("position_ids"):
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            if rest in _VISION_TOP:
                out["vision." + _VISION_TOP[rest]] = value
            elif m := _VISION_BLOCK.fullmatch(rest):
                out[f"vision.encoder.layers.{m.group(1)}.{_VISION_PARTS[m.group(2)]}.{m.group(3)}"] = value
            else:
                raise SpoxlError(f"imagereward: {file}: key {key} is not part of BLIP's ViT")
        elif key.startswith("blip.text_encoder."):
            out["text." + key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            out["head." + key[len("mlp.layers."):]] = value
        else:
            raise SpoxlError(f"imagereward: {file}: key {key} is not in ImageReward's layout (blip.*, mlp.layers.*)")
    return out


def _read(weights: Path) -> dict:
    if not weights.is_file():
        raise SpoxlError(f"imagereward: checkpoint {weights} does not exist")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SpoxlError(f"imagereward: {weights} is not a torch checkpoint ({str(e).splitlines()[0][:100]})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpoxlError(f"imagereward: {weights} holds no state dict of tensors")
    return state


def _configs(state: dict, med: dict, tokenizer, file):
    from transformers import BlipTextConfig, BlipVisionConfig

    def count(pattern):
        return 1 + max((int(m.group(1)) for k in state if (m := re.fullmatch(pattern, k))), default=-1)

    try:
        v_width, _, patch, _ = state["vision.embeddings.patch_embedding.weight"].shape
        positions = state["vision.embeddings.position_embedding"].shape[1]
        v_mlp = state["vision.encoder.layers.0.mlp.fc1.weight"].shape[0]
        vocab, t_width = state["text.embeddings.word_embeddings.weight"].shape
        t_positions = state["text.embeddings.position_embeddings.weight"].shape[0]
        t_mlp = state["text.encoder.layer.0.intermediate.dense.weight"].shape[0]
        encoder_width = state["text.encoder.layer.0.crossattention.self.key.weight"].shape[1]
    except KeyError as e:
        raise SpoxlError(f"imagereward: {file} lacks the tensor for {e.args[0]}: not an ImageReward checkpoint") from None
    grid = round((positions - 1) ** 0.5)
    vision = BlipVisionConfig(hidden_size=v_width, intermediate_size=v_mlp, num_hidden_layers=count(r"vision\.encoder\.layers\.(\d+)\..*"),
                              num_attention_heads=v_width // HEAD_WIDTH, image_size=grid * patch, patch_size=patch,
                              hidden_act="gelu", layer_norm_eps=1e-6)  # fmt: skip
    text = BlipTextConfig(vocab_size=vocab, hidden_size=t_width, encoder_hidden_size=encoder_width,
                          intermediate_size=t_mlp, num_hidden_layers=count(r"text\.encoder\.layer\.(\d+)\..*"),
                          num_attention_heads=med.get("num_attention_heads", t_width // HEAD_WIDTH),
                          max_position_embeddings=t_positions, hidden_act=med.get("hidden_act", "gelu"),
                          layer_norm_eps=med.get("layer_norm_eps", 1e-12), is_decoder=True,
                          pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.sep_token_id)  # fmt: skip
    return vision, text


class _ImageRewardNet(nn.Module):
    def __init__(self, vision_config, text_config):
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        from spoxl.models.rewards import aesthetic_mlp

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = aesthetic_mlp(text_config.hidden_size)  # the same 5-Linear head as the LAION predictor


class ImageReward:
    """ImageReward: scale x the standardised reward, the timestep ignored.

    `path`: BLIP's BERT tokenizer folder (bert-base-uncased; [DEC] and [ENC] are added as BLIP
    does); `weights`: the released ImageReward.pt (its med_config.json, when beside it, supplies the
    text encoder's heads, activation and layer-norm eps)."""

    input = "images"

    def __init__(self, path, weights, scale: float = 1.0):
        from transformers import BertTokenizer

        if not weights:
            raise SpoxlError("imagereward needs its checkpoint (ImageReward.pt) as preference.weights / --scorer-weights")
        weights, path = Path(weights), Path(path)
        if not any((path / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
            raise SpoxlError(f"imagereward: no BERT tokenizer in {path} (vocab.txt or tokenizer.json of bert-base-uncased)")
        try:
            self.tokenizer = BertTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise SpoxlError(f"imagereward: no BERT tokenizer in {path}: {str(e).splitlines()[0]}") from None
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        med_file = weights.with_name("med_config.json")
        try:
            med = json.loads(med_file.read_text()) if med_file.is_file() else {}
        except ValueError as e:
            raise SpoxlError(f"imagereward: {med_file} is not valid JSON: {e}") from None
        state = mapped_state(_read(weights), weights)
        self.net = _ImageRewardNet(*_configs(state, med, self.tokenizer, weights)).eval()
        load_strict(self.net, state, what="imagereward", file=weights, into="ImageReward's BLIP")
        if len(self.tokenizer) > self.net.text.config.vocab_size:
            raise SpoxlError(f"imagereward: tokenizer in {path} has {len(self.tokenizer)} tokens, the checkpoint "
                             f"{self.net.text.config.vocab_size}")  # fmt: skip
        self.scale = float(scale)
        self.image_size = self.net.vision.config.image_size

    def to(self, device=None, dtype=None):
        self.net.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps=None) -> torch.Tensor:
        check_inputs(images, prompts)
        param = next(self.net.parameters())
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt").to(param.device)  # fmt: skip
        image_embeds = self.net.vision(pixel_values=clip_pixel_values(images, self.image_size, param.dtype).to(param.device)).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=param.device)
        hidden = self.net.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                               encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask).last_hidden_state
        reward = self.net.head(hidden[:, 0].float().to(param.dtype)).squeeze(-1).float()
        return self.scale * (reward - REWARD_MEAN) / REWARD_STD
