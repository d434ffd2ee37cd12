"""HPSv2 / HPSv2.1 (Wu et al. 2023) as a reward model, loaded from the released checkpoint into
transformers' CLIPModel: no open_clip at run time (its import needs torchvision's compiled ops).

The released files (HPS_v2_compressed.pt, HPS_v2.1_compressed.pt) hold {"state_dict": ...} of an
open_clip ViT-H-14 CLIP; the official scorer (tgxs002/HPSv2 score.py) computes
    image_features @ text_features.T   (both L2-normalised, no logit scale)
on the CLIP-preprocessed image (bicubic resize to 224, centre crop, OpenAI mean/std) and the
open_clip-tokenised prompt. spoxl reports `scale` x that cosine (default 100, the ~100 x cos
convention of spoxl's scorers: HPSv2 scores of SDXL images are ~0.27-0.30 -> 27-30).

The open_clip -> CLIPModel map is a rename, except that open_clip keeps attention's q, k, v in one
in_proj (split here in that order) and its projections as [width, embed] matrices (transposed):
  visual.conv1 / class_embedding / positional_embedding / ln_pre / ln_post / proj
      -> vision_model.embeddings.patch_embedding / .class_embedding / .position_embedding /
         vision_model.pre_layrnorm / .post_layernorm / visual_projection (transposed)
  {visual.}transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}
      -> {vision,text}_model.encoder.layers.N.{layer_norm1, self_attn.{q,k,v}_proj, self_attn.out_proj,
         layer_norm2, mlp.fc1, mlp.fc2}
  token_embedding / positional_embedding / ln_final / text_projection / logit_scale
      -> text_model.embeddings.token_embedding / .position_embedding / text_model.final_layer_norm /
         text_projection (transposed) / logit_scale
Sizes (widths, depths, patch, image size, vocabulary, context) are read from the tensors' shapes;
attention heads from ViT-H-14's head widths (80 for the vision tower, 64 for the text tower), the
one thing shapes do not tell. Both towers use exact GELU (open_clip ViT-H-14 has no QuickGELU).
The text tower pools at the end-of-text token, as open_clip's argmax over token ids does.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from spoxl.errors import SpoxlError
from spoxl.models.preference_io import check_inputs, clip_pixel_values, load_strict

VISION_HEAD_WIDTH = 80  # ViT-H-14: 1280 wide, 16 heads
TEXT_HEAD_WIDTH = 64  # ViT-H-14's text tower: 1024 wide, 16 heads
_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_BLOCK_PARTS = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
_TOP = {"visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight", "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight", "ln_final.bias": "text_model.final_layer_norm.bias",
        "logit_scale": "logit_scale"}  # fmt: skip
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_IGNORED = ("attn_mask",)  # open_clip's causal-mask buffer (CLIPModel builds its own)


def read_checkpoint(weights) -> dict:
    """The released file's open_clip state dict (under "state_dict"; a bare state dict and a
    DataParallel "module." prefix are accepted too), loaded with weights_only=True."""
    weights = Path(weights)
    if not weights.is_file():
        raise SpoxlError(f"hpsv2: checkpoint {weights} does not exist")
    try:
        obj = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SpoxlError(f"hpsv2: {weights} is not a torch checkpoint ({str(e).splitlines()[0][:100]})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpoxlError(f"hpsv2: {weights} holds no state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def clip_state_dict(state: dict, file="the checkpoint") -> dict:
    """open_clip CLIP keys -> transformers CLIPModel keys (see the module docstring)."""
    out = {}
    for key, value in state.items():
        if key in _IGNORED:
            continue
        if key in _TOP:
            out[_TOP[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif m := _BLOCK.fullmatch(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]  # weight | bias
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.contiguous()
                continue
            module, _, param = rest.rpartition(".")
            if module not in _BLOCK_PARTS:
                raise SpoxlError(f"hpsv2: {file}: key {key} is not part of an open_clip ViT CLIP")
            out[f"{prefix}{_BLOCK_PARTS[module]}.{param}"] = value
        else:
            raise SpoxlError(f"hpsv2: {file}: key {key} is not part of an open_clip ViT CLIP")
    return out


def clip_config(state: dict, eos_token_id: int, file="the checkpoint"):
    """A CLIPConfig for the open_clip state dict, sizes from its shapes."""
    from transformers import CLIPConfig

    def layers(prefix):
        return 1 + max((int(m.group(2)) for k in state if (m := _BLOCK.fullmatch(k)) and bool(m.group(1)) == (prefix == "visual")),
                       default=-1)  # fmt: skip

    try:
        conv = state["visual.conv1.weight"]
        v_width, patch = conv.shape[0], conv.shape[-1]
        grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        t_vocab, t_width = state["token_embedding.weight"].shape
        context = state["positional_embedding"].shape[0]
        embed = state["text_projection"].shape[1]
        v_mlp = state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        t_mlp = state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    except KeyError as e:
        raise SpoxlError(f"hpsv2: {file} lacks {e.args[0]}: not an open_clip ViT CLIP") from None
    if v_width % VISION_HEAD_WIDTH or t_width % TEXT_HEAD_WIDTH:
        raise SpoxlError(f"hpsv2: {file}: widths {v_width}/{t_width} do not split into ViT-H-14's head widths "
                         f"{VISION_HEAD_WIDTH}/{TEXT_HEAD_WIDTH}")  # fmt: skip
    vision = dict(hidden_size=v_width, intermediate_size=v_mlp, num_hidden_layers=layers("visual"),
                  num_attention_heads=v_width // VISION_HEAD_WIDTH, patch_size=patch, image_size=grid * patch,
                  hidden_act="gelu", layer_norm_eps=1e-5)  # fmt: skip
    text = dict(vocab_size=t_vocab, hidden_size=t_width, intermediate_size=t_mlp, num_hidden_layers=layers("text"),
                num_attention_heads=t_width // TEXT_HEAD_WIDTH, max_position_embeddings=context, hidden_act="gelu",
                layer_norm_eps=1e-5, eos_token_id=eos_token_id, bos_token_id=eos_token_id - 1, pad_token_id=eos_token_id)  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed)


class HPSv2:
    """HPSv2(.1) reward: scale x cos(image, prompt) of the released CLIP, the timestep ignored.

    `path`: a CLIP tokenizer folder (the OpenAI CLIP BPE, as open_clip's tokenizer; e.g. the
    tokenizer of laion/CLIP-ViT-H-14-laion2B-s32B-b79K or of PickScore_v1); `weights`: the released
    HPS_v2(.1)_compressed.pt."""

    input = "images"

    def __init__(self, path, weights, scale: float = 100.0):
        from transformers import AutoTokenizer, CLIPModel

        if not weights:
            raise SpoxlError("hpsv2 needs its checkpoint (HPS_v2.1_compressed.pt) as preference.weights / --scorer-weights")
        path = Path(path)
        if not any((path / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            raise SpoxlError(f"hpsv2: no CLIP tokenizer in {path} (vocab.json + merges.txt, or tokenizer.json)")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise SpoxlError(f"hpsv2: no CLIP tokenizer in {path}: {str(e).splitlines()[0]}") from None
        state = read_checkpoint(weights)
        config = clip_config(state, self.tokenizer.eos_token_id, weights)
        self.model = CLIPModel(config).eval()
        load_strict(self.model, clip_state_dict(state, weights), what="hpsv2", file=weights,
                    into="an open_clip ViT CLIP")  # fmt: skip
        if len(self.tokenizer) > config.text_config.vocab_size:
            raise SpoxlError(f"hpsv2: tokenizer in {path} has {len(self.tokenizer)} tokens, the checkpoint's text "
                             f"tower {config.text_config.vocab_size}")  # fmt: skip
        self.scale = float(scale)
        self.image_size = config.vision_config.image_size

    def to(self, device=None, dtype=None):
        self.model.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], timesteps=None) -> torch.Tensor:
        check_inputs(images, prompts)
        param = next(self.model.parameters())
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True,
                                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")  # fmt: skip
        image = self.model.get_image_features(pixel_values=clip_pixel_values(images, self.image_size, param.dtype).to(param.device))
        text = self.model.get_text_features(input_ids=tokens.input_ids.to(param.device))
        image = image.pooler_output if hasattr(image, "pooler_output") else image
        text = text.pooler_output if hasattr(text, "pooler_output") else text
        cos = (F.normalize(image.float(), dim=-1) * F.normalize(text.float(), dim=-1)).sum(-1)
        return self.scale * cos
