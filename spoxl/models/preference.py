"""The step-aware preference model (SPM): score(images, prompts, timesteps) -> scores [N].

Two families share that one interface (`PreferenceModel`, spoxl.models.preference_io):

  * `StepAwareCLIP`: the SPO step-aware preference model (methods.md 1.6): a transformers
    CLIPModel whose vision tower is conditioned on the diffusion timestep, DiT-style.
    sinusoidal(t, 256) -> Linear -> SiLU -> Linear gives a conditioning vector c; every vision
    block becomes  h += g1 * Attn(LN1(h) (1 + s1) + b1);  h += g2 * MLP(LN2(h) (1 + s2) + b2)
    with (b1, s1, g1, b2, s2, g2) = Linear(SiLU(c)), and the pooled CLS output (after the
    post-LayerNorm) becomes (1 + s) * pooled + b. At init the modulation weights are 0, the biases
    are 0 except the gates (1), and the final adaLN is all-zero, so the model IS the untimed CLIP
    until it is trained. Score = logit_scale.exp() * cos(image_features, text_features).
  * programmatic scorers (spoxl.models.scorers) for runs without a trained model.

The interface and its input helpers: spoxl.models.preference_io. Any preference model by name
(the config entry point): spoxl.preference_models.build_preference_model.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spoxl.errors import SpoxlError
from spoxl.models.preference_io import as_timesteps, check_inputs, clip_pixel_values

TIME_FREQ_DIM = 256
TIME_MAX_PERIOD = 10000


# ---------------------------------------------------------------------------------------------
# Timestep conditioning (DiT)


def timestep_embedding(t: torch.Tensor, dim: int = TIME_FREQ_DIM, max_period: int = TIME_MAX_PERIOD):
    """Sinusoidal features [N, dim]: cos then sin of t * max_period^(-i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """sinusoidal(t) -> Linear(256, width) -> SiLU -> Linear(width, width); weights N(0, 0.02)."""

    def __init__(self, width: int, freq_dim: int = TIME_FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))
        for layer in (self.mlp[0], self.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        return self.mlp(timestep_embedding(t, self.freq_dim).to(dtype))


def _modulation(width: int, chunks: int, gate_chunks: tuple[int, ...] = ()) -> nn.Sequential:
    """SiLU -> Linear(width, chunks * width), zero weights; bias 1 on the gate chunks, else 0."""
    linear = nn.Linear(width, chunks * width)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    with torch.no_grad():
        for c in gate_chunks:
            linear.bias[c * width : (c + 1) * width] = 1.0
    return nn.Sequential(nn.SiLU(), linear)


class AdaLNBlock(nn.Module):
    """Runs a CLIP encoder layer (its own LayerNorms, attention and MLP, untouched and owned by the
    CLIPModel, so weights are not registered twice) with timestep-dependent shift/scale/gate
    around both sub-layers."""

    def __init__(self, width: int):
        super().__init__()
        # chunk order: shift1, scale1, gate1, shift2, scale2, gate2 (gates start at 1).
        self.modulation = _modulation(width, 6, gate_chunks=(2, 5))

    def forward(self, layer: nn.Module, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).unsqueeze(1).chunk(6, dim=-1)
        x = layer.layer_norm1(h) * (1 + scale1) + shift1
        attn, _ = layer.self_attn(hidden_states=x, attention_mask=None)
        h = h + gate1 * attn
        x = layer.layer_norm2(h) * (1 + scale2) + shift2
        return h + gate2 * layer.mlp(x)


# ---------------------------------------------------------------------------------------------
# The SPO step-aware CLIP


def tiny_clip_config(image_size: int = 32, seed_width: int = 32):
    """A small CLIPConfig for CPU tests and demos (byte-level vocabulary of the tiny tokenizer)."""
    from transformers import CLIPConfig

    from spoxl.models.tiny import tiny_clip_tokenizer

    vocab = len(tiny_clip_tokenizer().get_vocab())
    text = dict(
        vocab_size=vocab,
        hidden_size=seed_width,
        intermediate_size=2 * seed_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    vision = dict(
        hidden_size=seed_width,
        intermediate_size=2 * seed_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=seed_width)


class StepAwareCLIP(nn.Module):
    """CLIP dual encoder with a timestep-conditioned vision tower (identity at init)."""

    input = "images"

    def __init__(self, clip, tokenizer):
        super().__init__()
        self.clip = clip
        self.tokenizer = tokenizer
        vision = clip.vision_model
        width = vision.config.hidden_size
        self.image_size = vision.config.image_size
        self.time_embed = TimestepEmbedder(width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in vision.encoder.layers)
        # Final adaLN on the pooled output: all-zero so (1 + s) * x + b is x at init.
        self.final_modulation = _modulation(width, 2)

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def tiny(cls, seed: int = 0, image_size: int = 32) -> "StepAwareCLIP":
        from transformers import CLIPModel

        from spoxl.models.tiny import tiny_clip_tokenizer

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(CLIPModel(tiny_clip_config(image_size)), tiny_clip_tokenizer())
        return model.eval()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, weights: str | os.PathLike | None = None):
        """A CLIPModel + tokenizer from a local folder (e.g. a PickScore_v1 copy), optionally with
        trained SPM weights (`load`: spoxl's safetensors, or an official .bin release)."""
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise SpoxlError(f"preference model folder {path} has no config.json")
        try:
            clip = CLIPModel.from_pretrained(path, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise SpoxlError(f"could not load CLIP model {path}: {str(e).splitlines()[0]}") from None
        model = cls(clip, tokenizer)
        if weights is not None:
            model.load(weights)
        return model.eval()

    def save(self, file: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(file))

    def load(self, file: str | os.PathLike) -> None:
        """Trained SPM weights: a safetensors file written by `save`, or an official release
        (`sd-v1-5_step-aware_preference_model.bin`, `sdxl_step-aware_preference_model.bin`: a
        torch state dict in the official module names, read with weights_only=True and mapped by
        official_spm_keys). Strict: every key of this model must be given, no other."""
        from safetensors.torch import load_file

        file = Path(file)
        if not file.is_file():
            raise SpoxlError(f"preference model weights {file} do not exist")
        if file.suffix == ".safetensors":
            state = load_file(str(file))
        else:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as e:  # a full pickled object, or not a torch file at all
                raise SpoxlError(f"preference model weights {file} are not a torch state dict "
                                 f"({str(e).splitlines()[0][:120]})") from None  # fmt: skip
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise SpoxlError(f"preference model weights {file} are not a state dict of tensors")
            if any(k.startswith("model.") for k in state):
                state = official_spm_keys(state, file)
        state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        expected = {k for k in self.state_dict() if not k.endswith("position_ids")}
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            what = f"missing key {missing[0]}" if missing else f"unexpected key {unexpected[0]}"
            raise SpoxlError(f"preference model weights {file} do not match the model ({what}; "
                             f"{len(missing)} missing, {len(unexpected)} unexpected)")  # fmt: skip
        own = self.state_dict()
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise SpoxlError(f"preference model weights {file} do not match the model (key {k}: shape "
                                 f"{tuple(v.shape)}, the model has {tuple(own[k].shape)})")  # fmt: skip
        self.load_state_dict(state, strict=False)  # strict on the keys above; position_ids are buffers

    # ---- forward pieces --------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return clip_pixel_values(images, self.image_size, self.clip.logit_scale.dtype)

    def image_features(self, pixel_values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        vision = self.clip.vision_model
        c = self.time_embed(timesteps)
        h = vision.pre_layrnorm(vision.embeddings(pixel_values))
        for layer, block in zip(vision.encoder.layers, self.blocks):
            h = block(layer, h, c)
        pooled = vision.post_layernorm(h[:, 0, :])
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        pooled = pooled * (1 + scale) + shift
        return self.clip.visual_projection(pooled)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        device = self.clip.logit_scale.device
        tok = self.tokenizer(
            list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        out = self.clip.get_text_features(
            input_ids=tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device)
        )
        return out.pooler_output if hasattr(out, "pooler_output") else out

    def _similarity(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        img = F.normalize(img.float(), dim=-1)
        txt = F.normalize(txt.float(), dim=-1)
        return self.clip.logit_scale.exp().float() * (img * txt).sum(-1)

    def score(self, images: torch.Tensor, prompts: list[str], timesteps) -> torch.Tensor:
        check_inputs(images, prompts)
        t = as_timesteps(timesteps, images.shape[0], images.device)
        pixels = self.preprocess(images)
        return self._similarity(self.image_features(pixels, t), self.text_features(prompts))

    def untimed_score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The plain CLIP (PickScore-style) score, ignoring the time conditioning."""
        check_inputs(images, prompts)
        out = self.clip.get_image_features(pixel_values=self.preprocess(images))
        img = out.pooler_output if hasattr(out, "pooler_output") else out
        return self._similarity(img, self.text_features(prompts))


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The official release's key layout


_OFFICIAL_BLOCK = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.adaLN_modulation\.(.+)")


def official_spm_keys(state: dict, file="the state dict") -> dict:
    """The official step-aware preference model's keys in this module's names (a pure rename;
    the chunk orders are the same: (shift, scale, gate) x 2 per block, final (shift, scale)):
      model.t_embedder.mlp.*                                    -> time_embed.mlp.*
      model.vision_model.encoder.layers.N.adaLN_modulation.*    -> blocks.N.modulation.*
      model.vision_model.adaLN_modulation.*                     -> final_modulation.*
      model.X (the CLIP itself)                                 -> clip.X
    position_ids buffers are dropped."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if not key.startswith("model."):
            raise SpoxlError(f"preference model weights {file}: key {key} is not in the official layout (model.*)")
        rest = key[len("model."):]
        block = _OFFICIAL_BLOCK.fullmatch(rest)
        if rest.startswith("t_embedder.mlp."):
            new = "time_embed.mlp." + rest[len("t_embedder.mlp."):]
        elif block:
            new = f"blocks.{block.group(1)}.modulation.{block.group(2)}"
        elif rest.startswith("vision_model.adaLN_modulation."):
            new = "final_modulation." + rest[len("vision_model.adaLN_modulation."):]
        else:
            new = "clip." + rest
        out[new] = value
    return out
