"""LPO: step-level preference optimisation with a latent reward model (lpo.md; arXiv 2502.01051).

SPO's engine, loss and rollout stream with LPO's sampler mode and settings:
  * the preference model is a latent reward model (spoxl.models.lrm, `preference.kind: lrm`)
    that scores the k candidates x_{t-1} THEMSELVES, conditioned on the current t: no x0
    prediction, no VAE decode, and only the continued candidate is denoised next step;
  * per-step branching from the first step (k = 4, num_inner_step 0, divert_start_step 0);
  * the dynamic threshold: keep a pair when tanh((s_w - s_l) / 2) (the softmax gap) exceeds a
    threshold growing linearly with the step's DDIM(eta = 1) std from `threshold` (0.45 for
    SDXL) to `threshold_max` (0.6), computed from the scheduler for any step count;
  * SPO's clipped log-ratio DPO loss with beta 500, clip 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from spoxl.errors import SpoxlError
from spoxl.methods.spo import PreferenceConfig, SPOConfig, SPOObjective


@dataclass
class LPOConfig(SPOConfig):
    pool_size: int = 4
    num_inner_step: int = 0
    divert_start_step: int = 0
    threshold: float = 0.45  # at the grid's smallest DDIM std (the last step)
    threshold_max: Optional[float] = 0.6  # at the largest (the first step); null: a fixed threshold
    score_candidates: bool = True
    beta: float = 500.0
    clip: float = 0.1
    preference: PreferenceConfig = field(default_factory=lambda: PreferenceConfig(kind="lrm"))


class LPOObjective(SPOObjective):
    name = "lpo"
    Config = LPOConfig

    @classmethod
    def sampling_batch(cls, recipe) -> tuple[int, int]:
        # Each step: the LRM scores prompts_per_rank x pool_size candidates with and without the
        # prompt (visual feature enhancement) through the UNet's down and mid blocks; nothing is
        # decoded. The policy's own call is smaller (the continued candidate only, with CFG).
        p = recipe.method.params
        return 2 * p.candidates(p.prompts_per_rank), 0

    def check(self, config) -> None:
        if not self.config.score_candidates:
            raise SpoxlError("method lpo scores the candidates themselves (score_candidates: true); "
                             "for SPO's predicted-x0 scoring use method spo")
        if self.config.preference.kind != "lrm":
            raise SpoxlError(f"method lpo needs a latent reward model (method.preference.kind: lrm), "
                             f"got {self.config.preference.kind!r}")
        super().check(config)


OBJECTIVE = LPOObjective
