"""MaPO, margin-aware preference optimization (Hong et al. 2024; methods.md section 3): no reference.

For a pair (x0_w, x0_l) with one caption: one t and one noise shared by w and l; per-sample MSEs
L_w, L_l of the policy against the training target (the noise, or v); the bounded score
g(L) = s L / (exp(s L) - 1) with s = snr (0.5); and
    loss = mean(L_w) - beta * mean(logsigmoid(T (g(L_w) - g(L_l)))),   beta = 0.1,
T = the scheduler's num_train_timesteps (1000), as in the official utils.compute_loss.

One policy forward on the stacked [w; l] batch; the head is spoxl.kernels.mapo_loss. Without a
reference, a LoRA run never toggles adapters and a full fine-tune keeps no frozen copy (the
memory saving MaPO is known for). Data and caching are those of Diffusion-DPO.
"""

from __future__ import annotations

from dataclasses import dataclass

from spoxl import kernels
from spoxl.engine.view import RunView
from spoxl.methods._offline import OfflineObjective, finite_number, stacked_pair_inputs


@dataclass
class MaPOConfig:
    beta: float = 0.1  # weight of the margin term against the SFT term on the chosen images
    snr: float = 0.5  # s in the score g(L) = s L / (exp(s L) - 1) (the official `snr_value`)
    # Debug/sanity mode: the same noise, timesteps and VAE sample at every step (see SFT).
    fixed_noise: bool = False

    def __post_init__(self):
        finite_number("method.beta", self.beta, strict=False)  # 0: plain SFT on the chosen images
        finite_number("method.snr", self.snr)


class MaPOObjective(OfflineObjective):
    name = "mapo"
    Config = MaPOConfig


    def loss(self, run: RunView, batch):
        *unet_inputs, target = stacked_pair_inputs(run, batch, self.noise)
        pred_w, pred_l = run.unet_output(run.policy, *unet_inputs).chunk(2)
        target_w, target_l = target.chunk(2)
        loss, metrics = kernels.mapo_loss(
            pred_w, pred_l, target_w, target_l, beta=self.config.beta, snr=self.config.snr,
            num_train_timesteps=run.components.scheduler.config.num_train_timesteps, return_metrics=True)
        metrics["timestep"] = unet_inputs[1].float().mean()
        return loss, metrics


OBJECTIVE = MaPOObjective
