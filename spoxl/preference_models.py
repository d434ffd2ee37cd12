"""Any preference model by name: the one entry point configs, `spoxl eval` and the SPM trainer use.

  clip / step_aware_clip     the step-aware CLIP (spoxl.models.preference), from a CLIPModel folder
                             (or "tiny") plus its step-aware weights
  pickscore, laion_aesthetic, hpsv2, hpsv2.1, imagereward
                             real reward models from local paths (spoxl.models.rewards)
  lrm                        LPO's latent reward model (spoxl.models.lrm): scores noisy latents;
                             path an LRM folder (the released layout or ours) or "toy" (the
                             toy world's, shipped); untrained from the policy with allow_untrained
  colour, color, brightness  programmatic scorers (spoxl.models.scorers)
  fidelity, aesthetic, toy_* the toy world's exact scorers (spoxl.toy.scorers)

It sits above spoxl.models and spoxl.toy (it imports both), so neither imports the other's registry.
"""

from __future__ import annotations

from spoxl.errors import SpoxlError
from spoxl.models import scorers
from spoxl.models.preference import StepAwareCLIP
from spoxl.toy.scorers import build as _toy_scorer

# Preference models that are networks loaded from a path: they take no `scale` from the recipe or
# `spoxl eval --scorer-scale` (their own scale is part of the model).
REWARD_KINDS = ("pickscore", "laion_aesthetic", "hpsv2", "hpsv2.1", "imagereward")  # build_reward_model
MODEL_KINDS = ("clip", "step_aware_clip", "lrm", *REWARD_KINDS)


# Programmatic scorers by name: the built-in ones and the toy world's exact ones ("fidelity", the
# combined prompt fidelity; one per attribute; the caption-free "aesthetic" proxy).
SCORERS = {**scorers.SCORERS, "fidelity": _toy_scorer("fidelity"), "aesthetic": _toy_scorer("aesthetic"),
           **{f"toy_{a}": _toy_scorer(a) for a in ("colour", "shape", "position", "size", "background")}}
TOY_SCORERS = tuple(k for k in SCORERS if k not in scorers.SCORERS)


def build_preference_model(kind: str, *, path: str | None = None, weights: str | None = None,
                           allow_untrained: bool = False, **kwargs):
    """A preference model by name: "clip" (step-aware CLIP from `path`, or "tiny"), or one of the
    programmatic scorers in spoxl.models.scorers ("colour", "brightness").

    "clip" needs its step-aware `weights`: without them the time conditioning is the identity at
    init, so the model scores every timestep alike (a plain PickScore-style CLIP that ignores t)
    and SPO would silently train against the wrong judge. `allow_untrained=True` keeps that for
    experiments (and for the SPM trainer, which starts from it)."""
    if kind in ("clip", "step_aware_clip"):
        if not path:
            raise SpoxlError("preference model 'clip' needs a path: a local CLIPModel folder "
                             "(e.g. PickScore_v1), or 'tiny' for the toy model")
        if not weights and not allow_untrained:
            raise SpoxlError("preference model 'clip' has no step-aware weights: untrained, it ignores the timestep; "
                             "give preference.weights (from `spoxl train-preference-model`) or set "
                             "preference.allow_untrained: true for an experiment")
        if path == "tiny":
            model = StepAwareCLIP.tiny()
            if weights:
                model.load(weights)
            return model
        return StepAwareCLIP.from_pretrained(path, weights)
    if kind == "lrm":
        return build_lrm(path, allow_untrained=allow_untrained, components=kwargs.get("components"))
    if kind in REWARD_KINDS:
        return build_reward_model(kind, path=path, weights=weights)
    if kind in SCORERS:
        return SCORERS[kind](**kwargs)
    known = ", ".join(["clip", *REWARD_KINDS, *sorted(SCORERS)])
    raise SpoxlError(f"unknown preference model {kind!r} (known: {known})")


# What each reward model's `path` holds, for the one-line error when it is missing.
_PATH_HOLDS = {"pickscore": "a CLIPModel folder (PickScore_v1)", "laion_aesthetic": "a CLIP ViT-L/14 CLIPModel folder",
               "hpsv2": "a CLIP tokenizer folder (OpenAI CLIP BPE)", "hpsv2.1": "a CLIP tokenizer folder (OpenAI CLIP BPE)",
               "imagereward": "a bert-base-uncased tokenizer folder"}  # fmt: skip


def build_reward_model(kind: str, *, path=None, weights=None):
    """A reward model by name, from local paths only (`path` and `weights` as _PATH_HOLDS and each
    class's docstring say); each keeps its own scale."""
    if not path:
        raise SpoxlError(f"preference model {kind!r} needs a path: {_PATH_HOLDS[kind]}")
    from spoxl.models import rewards

    if kind == "pickscore":
        return rewards.PickScore(path)
    if kind == "laion_aesthetic":
        return rewards.LaionAesthetic(path, weights)
    if kind in ("hpsv2", "hpsv2.1"):
        from spoxl.models.hpsv2 import HPSv2

        return HPSv2(path, weights)
    if kind == "imagereward":
        from spoxl.models.imagereward import ImageReward

        return ImageReward(path, weights)
    raise SpoxlError(f"unknown reward model {kind!r}")


def build_lrm(path, *, allow_untrained: bool = False, components=None):
    """LPO's latent reward model: from an LRM folder (the released layout takes its tokenizers
    from `components`, the policy's SDXL), "toy" (the toy world's trained LRM), or, with
    allow_untrained, a fresh one initialised from the policy (`components`), as LRM training
    starts; an untrained LRM scores at random, so a run would train against noise."""
    from spoxl.models.lrm import LatentRewardModel

    if not path:
        if not allow_untrained:
            raise SpoxlError("preference model 'lrm' needs a path: an LRM folder (unet/, text_encoder/, text_encoder_2/ "
                             "and state_dict.pt or lrm_head.safetensors), or 'toy'; an untrained one from the policy "
                             "needs preference.allow_untrained: true")
        if components is None:
            raise SpoxlError("preference model 'lrm' without a path is built from the policy's components: none given")
        return LatentRewardModel.from_components(components)
    if path == "toy":
        from spoxl.paths import toy_lrm_path

        path = toy_lrm_path()
    tokenizers = None if components is None else (components.tokenizer, components.tokenizer_2)
    return LatentRewardModel.from_folder(path, tokenizers=tokenizers)
