"""The latent reward model (LRM) of LPO (lpo.md 1): a step-aware preference model that scores
NOISY LATENTS directly, built from the diffusion model itself. No VAE decode, no CLIP image tower.

    features(z, t, prompt) = the SDXL UNet run up to its mid block (up blocks dropped) on z at the
        sampler's timestep t; the last resnet output of every down block (SDXL: down residuals
        2, 5, 8, i.e. 320 ch at 128^2, 640 at 64^2, 1280 at 32^2) and the mid block output, each
        global-average-pooled
    visual feature enhancement: the pooled MID feature only is guided against the empty prompt,
        m = m_u + g (m_c - m_u), g = 7.5; the down features are the prompt branch's
    V = Linear(concat(pooled features) -> text dim, bias=False)
    T = the projected pooled output of text_encoder_2 (SDXL's `text_embeds`), for the prompt
    score = exp(logit_scale) * cos(V, T)

The UNet context is the penultimate hidden states of both text encoders, concatenated (as the
SDXL pipeline); `add_time_ids` are fixed at the native resolution, (H, W, 0, 0, H, W), 1024 for
SDXL. The empty prompt is ENCODED "" (not zeros), as the official model (its tokenizers' "").

SD1.5 (LRM-1.5, lrm/lrm_15 of the official code): one text encoder; the context is its last hidden
state, T = text_projection(its pooled output), a bias-free Linear the LRM owns (the official
initialises it from CLIP ViT-L/14's text_projection, which is not part of an SD1.5 folder: a
fresh one starts at the identity here); four down blocks, so the features are down residuals 2,
5, 8, 11 and the mid block (4800 dims); no added conditioning.

Weights: `LatentRewardModel.from_folder(path)` reads the released layout (casiatao/LRM: unet/,
text_encoder/, text_encoder_2/, state_dict.pt holding {"visual_projection": {"weight"},
"logit_scale"}) or the one `save` writes (lrm_head.safetensors instead of state_dict.pt, plus the
tokenizers). Only the UNet's down blocks, mid block and embeddings are read from the weight
files: the up blocks (1.3 B of SDXL's 2.6 B parameters) never reach memory.
`LatentRewardModel.from_components(components)` builds a fresh one from a loaded model (the toy
LRM, tests), projection N(0, 0.02) and logit_scale ln(1/0.07) as the official initialisation.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from spoxl import sampling
from spoxl.errors import SpoxlError
from spoxl.models.preference_io import as_timesteps, check_inputs

GUIDANCE_SCALE = 7.5  # visual feature enhancement (the official "cfg75")
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # 2.6592, as CLIP and the official LRM
HEAD_FILE = "lrm_head.safetensors"  # ours; the released weights have state_dict.pt
RELEASED_HEAD_FILE = "state_dict.pt"
DROPPED_UNET_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")


def truncate_unet(unet: nn.Module) -> nn.Module:
    """Drop everything after the mid block (in place): the LRM never runs it."""
    unet.up_blocks = nn.ModuleList()
    for name in ("conv_norm_out", "conv_act", "conv_out"):
        setattr(unet, name, None)
    return unet


def feature_indices(unet_config) -> list[int]:
    """Which down-path residuals are the multi-scale features: the last resnet output of every
    down block, before its downsampler. The residual tuple is (conv_in, then per block its
    layers_per_block resnet outputs and, except the last block, the downsampler's), so block i's
    last resnet is at 1 + i (L + 1) + L - 1: SDXL (L = 2, 3 blocks) gives 2, 5, 8, the official
    indices."""
    layers = unet_config["layers_per_block"]
    if not isinstance(layers, int):
        raise SpoxlError(f"LRM: per-block layers_per_block {layers!r} is not supported")
    blocks = len(unet_config["down_block_types"])
    return [1 + i * (layers + 1) + layers - 1 for i in range(blocks)]


def unet_down_and_mid(unet, x, t, encoder_hidden_states, added_cond_kwargs):
    """(mid, down residuals) of a diffusers UNet2DConditionModel, computed exactly as its own
    forward up to the mid block (no adapters, no ControlNet residuals, no attention masks)."""
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    ehs = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                             added_cond_kwargs=added_cond_kwargs)  # fmt: skip
    h = unet.conv_in(x)
    residuals = (h,)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=ehs)
        else:
            h, res = block(hidden_states=h, temb=emb)
        residuals += res
    if getattr(unet.mid_block, "has_cross_attention", False):
        h = unet.mid_block(h, emb, encoder_hidden_states=ehs)
    else:
        h = unet.mid_block(h, emb)
    return h, residuals


class LatentRewardModel(nn.Module):
    """score(latents, prompts, timesteps) -> [N] (the PreferenceModel interface, input "latents").
    text_encoder_2 None: the SD1.5 LRM (module docstring)."""

    input = "latents"

    def __init__(self, unet, text_encoder, text_encoder_2, tokenizer, tokenizer_2, *,
                 guidance_scale: float = GUIDANCE_SCALE, vae_scale_factor: int = 8):  # fmt: skip
        super().__init__()
        self.unet = truncate_unet(unet)
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.guidance_scale = guidance_scale
        self.indices = feature_indices(unet.config)
        channels = list(unet.config["block_out_channels"])
        feature_dim = sum(channels) + channels[-1]  # one per down block, plus the mid block
        if text_encoder_2 is not None:  # SDXL: text_encoder_2's projected pooled output
            text_dim = text_encoder_2.config.projection_dim
            self.text_projection = None
        else:  # SD1.5: a projection of the one encoder's pooled output (module docstring)
            text_dim = text_encoder.config.hidden_size
            self.text_projection = nn.Linear(text_dim, text_dim, bias=False)
            nn.init.eye_(self.text_projection.weight)
        self.visual_projection = nn.Linear(feature_dim, text_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=0.02)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        side = unet.config["sample_size"] * vae_scale_factor
        self.register_buffer("time_ids", torch.tensor([side, side, 0, 0, side, side], dtype=torch.float32),
                             persistent=False)  # fmt: skip

    # ---- building ------------------------------------------------------------------------------

    @classmethod
    def from_components(cls, components, *, train_text_encoders: bool = True, **kw) -> "LatentRewardModel":
        """A fresh LRM initialised from a loaded model's UNet and text encoders (copies: the
        policy's own modules are never trained through the LRM). Every part is trainable, as the
        official LRM (freeze_text_encoder: False), unless train_text_encoders=False (the loader
        froze the policy's encoders; the copies are unfrozen here)."""
        unet = truncate_unet(copy.deepcopy(components.unet))
        vae_factor = sampling.vae_scale_factor(components.vae) if components.vae is not None else 8
        te2 = copy.deepcopy(components.text_encoder_2) if components.text_encoder_2 is not None else None
        model = cls(unet, copy.deepcopy(components.text_encoder), te2,
                    components.tokenizer, components.tokenizer_2, vae_scale_factor=vae_factor, **kw).float().eval()  # fmt: skip
        model.requires_grad_(True)
        if not train_text_encoders:
            model.freeze_text_encoders()
        return model

    def freeze_text_encoders(self) -> "LatentRewardModel":
        """Stop training both text encoders (the UNet part and the head still train)."""
        for part in (self.text_encoder, self.text_encoder_2):
            if part is not None:
                part.requires_grad_(False)
        return self

    @classmethod
    def from_folder(cls, path, *, tokenizers=None, vae_scale_factor: int = 8) -> "LatentRewardModel":
        """An LRM folder: the released layout or ours (module docstring). `tokenizers`: the
        (tokenizer, tokenizer_2) to use when the folder has none (the released weights ship
        without them: SDXL's own tokenizers)."""
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        folder = Path(path).expanduser()
        sdxl = (folder / "text_encoder_2").is_dir()
        for part in ("unet", "text_encoder") + (("text_encoder_2",) if sdxl else ()):
            if not (folder / part / "config.json").is_file():
                raise SpoxlError(f"LRM folder {folder}: no {part}/config.json (unet/, text_encoder/, text_encoder_2/ "
                                 f"and {RELEASED_HEAD_FILE} or {HEAD_FILE} are expected)")
        kw = dict(local_files_only=True)
        try:
            te1 = CLIPTextModel.from_pretrained(folder / "text_encoder", **kw)
            te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", **kw) if sdxl else None
            if (folder / "tokenizer").is_dir():
                tokenizers = (AutoTokenizer.from_pretrained(folder / "tokenizer", **kw),
                              AutoTokenizer.from_pretrained(folder / "tokenizer_2", **kw) if sdxl else None)  # fmt: skip
        except (OSError, ValueError) as e:
            raise SpoxlError(f"LRM folder {folder}: {str(e).splitlines()[0]}") from None
        if tokenizers is None:
            raise SpoxlError(f"LRM folder {folder} has no tokenizer/ and tokenizer_2/: pass the SDXL model's tokenizers")
        model = cls(load_truncated_unet(folder / "unet"), te1, te2, *tokenizers, vae_scale_factor=vae_scale_factor)
        model.load_head(folder)
        return model.float().eval()

    def load_head(self, folder: Path) -> None:
        """The projection and logit scale: ours (safetensors) or the released state_dict.pt
        (read with weights_only=True: tensors and dicts only)."""
        if (folder / HEAD_FILE).is_file():
            from safetensors.torch import load_file

            state = load_file(str(folder / HEAD_FILE))
        elif (folder / RELEASED_HEAD_FILE).is_file():
            try:
                raw = torch.load(folder / RELEASED_HEAD_FILE, map_location="cpu", weights_only=True)
                state = {"visual_projection.weight": raw["visual_projection"]["weight"],
                         "logit_scale": torch.as_tensor(raw["logit_scale"], dtype=torch.float32)}  # fmt: skip
                if "text_projection" in raw:  # LRM-1.5
                    state["text_projection.weight"] = raw["text_projection"]["weight"]
            except (KeyError, TypeError, RuntimeError) as e:
                raise SpoxlError(f"LRM: {folder / RELEASED_HEAD_FILE} is not the released head layout "
                                 f"({{'visual_projection': {{'weight'}}, 'logit_scale'}}): {e}") from None
        else:
            raise SpoxlError(f"LRM folder {folder} has neither {HEAD_FILE} nor {RELEASED_HEAD_FILE}")
        need = self._head_keys()
        if set(state) != set(need):
            raise SpoxlError(f"LRM head in {folder}: keys {sorted(state)} (need {', '.join(need)})")
        for key in need[:-1]:
            want = tuple(self.get_parameter(key).shape)
            if tuple(state[key].shape) != want:
                raise SpoxlError(f"LRM head in {folder}: {key.split('.')[0]} {tuple(state[key].shape)}, "
                                 f"this model needs {want}")
        with torch.no_grad():
            for key in need[:-1]:
                self.get_parameter(key).copy_(state[key])
            self.logit_scale.copy_(state["logit_scale"].reshape(()))
        self._text_cache = None  # the text projection may have changed

    def _head_keys(self) -> tuple[str, ...]:
        return ("visual_projection.weight",) + (("text_projection.weight",) if self.text_projection is not None else ()) \
            + ("logit_scale",)

    def save(self, folder) -> None:
        """Write our layout: unet/ (config + the truncated weights), text encoders, tokenizers, head."""
        from safetensors.torch import save_file

        folder = Path(folder)
        (folder / "unet").mkdir(parents=True, exist_ok=True)
        self.unet.save_config(folder / "unet")
        unet_state = {k: v.detach().contiguous() for k, v in self.unet.state_dict().items()}
        save_file(unet_state, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
        for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            if getattr(self, name) is not None:
                getattr(self, name).save_pretrained(folder / name)
        head = {k: self.get_parameter(k).detach().reshape(-1 if k == "logit_scale" else self.get_parameter(k).shape)
                .contiguous() for k in self._head_keys()}  # fmt: skip
        save_file(head, str(folder / HEAD_FILE))

    # ---- scoring -------------------------------------------------------------------------------

    def _tokens(self, prompts: list[str], device):
        out = []
        for tok in (self.tokenizer, self.tokenizer_2)[: 1 if self.text_encoder_2 is None else 2]:
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids  # fmt: skip
            out.append(ids.to(device))
        return out

    def encode_text(self, prompts: list[str]):
        """(UNet context [N, L, D], the UNet's pooled input [N, P] or None, text features T [N, P])."""
        ids = self._tokens(prompts, self.visual_projection.weight.device)
        if self.text_encoder_2 is None:  # SD1.5: last hidden state; T = text_projection(pooled)
            out = self.text_encoder(ids[0])
            return out.last_hidden_state, None, self.text_projection(out.pooler_output)
        ids1, ids2 = ids
        out1 = self.text_encoder(ids1, output_hidden_states=True)
        out2 = self.text_encoder_2(ids2, output_hidden_states=True)
        return torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1), out2.text_embeds, out2.text_embeds

    def train(self, mode: bool = True):
        self._text_cache = None  # the text encoders may change from here on
        return super().train(mode)

    def _encoded(self, texts: list[str]):
        """encode_text, remembered for the last list of texts while no gradient is taken: a
        sampling round scores the same prompts at every one of its steps (20 for LPO)."""
        if torch.is_grad_enabled() or self.training:
            return self.encode_text(texts)
        key = (tuple(texts), self.visual_projection.weight.device, self.visual_projection.weight.dtype)
        cached = getattr(self, "_text_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, self.encode_text(texts))
            self._text_cache = cached
        return cached[1]

    def features(self, latents: torch.Tensor, prompts: list[str], timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, T): the projected visual features [N, P] and the text features [N, P], unnormalised."""
        check_inputs(latents, prompts)
        channels = self.unet.config["in_channels"]
        if latents.shape[1] != channels:
            raise SpoxlError(f"the latent reward model scores {channels}-channel latents, got {latents.shape[1]} channels "
                             f"(decoded images? it is LPO's judge of noisy latents, not an image scorer)")
        n = latents.shape[0]
        dtype = self.visual_projection.weight.dtype
        t = as_timesteps(timesteps, n, latents.device).long()
        context, pooled, text = self._encoded(list(prompts) + [""])  # the empty prompt once, last
        ctx = torch.cat([context[:n], context[n:].expand(n, -1, -1)])
        z = latents.to(dtype)
        added = {}
        if pooled is not None:  # SDXL's text_time conditioning
            pool = torch.cat([pooled[:n], pooled[n:].expand(n, -1)])
            added = {"text_embeds": pool.to(dtype), "time_ids": self.time_ids.to(dtype).expand(2 * n, -1)}
        mid, residuals = unet_down_and_mid(self.unet, torch.cat([z, z]), torch.cat([t, t]), ctx.to(dtype), added)
        pooled_feats = [residuals[i].mean(dim=(2, 3))[:n] for i in self.indices]  # the prompt branch
        m = mid.mean(dim=(2, 3))
        m_c, m_u = m[:n], m[n:]
        pooled_feats.append(m_u + self.guidance_scale * (m_c - m_u))
        return self.visual_projection(torch.cat(pooled_feats, dim=-1)), text[:n]

    def score(self, latents: torch.Tensor, prompts: list[str], timesteps) -> torch.Tensor:
        v, t = self.features(latents, prompts, timesteps)
        return self.logit_scale.exp() * F.cosine_similarity(v.float(), t.float(), dim=-1)

    def check_prompts(self, prompts: list[str]) -> None:  # any text is a prompt for the LRM
        return None


def load_truncated_unet(folder: Path):
    """A UNet2DConditionModel from a diffusers unet/ folder with ONLY the weights the LRM runs:
    built on the meta device, truncated, then filled from the safetensors (sharded or not) by
    key, so the up blocks are never read. Strict: every kept parameter must be in the files."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    try:
        config = UNet2DConditionModel.load_config(folder)
    except (OSError, ValueError) as e:
        raise SpoxlError(f"LRM: {folder}: {str(e).splitlines()[0]}") from None
    with init_empty_weights():
        unet = truncate_unet(UNet2DConditionModel.from_config(config))
    files = _unet_weight_files(folder)
    want = set(unet.state_dict())
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if key.startswith(DROPPED_UNET_PREFIXES):
                    continue
                if key not in want:
                    raise SpoxlError(f"LRM: {f} does not load strictly into the truncated UNet (key {key})")
                state[key] = fh.get_tensor(key).float()
    missing = sorted(want - set(state))
    if missing:
        raise SpoxlError(f"LRM: {folder} misses {len(missing)} UNet weights (first: {missing[0]})")
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise SpoxlError(f"LRM: {folder}: {str(e).splitlines()[-1].strip()[:200]}") from None
    return unet


def _unet_weight_files(folder: Path) -> list[Path]:
    for name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.fp16.json"):
        index = folder / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / s for s in shards]
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        if (folder / name).is_file():
            return [folder / name]
    raise SpoxlError(f"LRM: {folder} has no diffusion_pytorch_model(.fp16).safetensors (safetensors weights only)")
