"""Diffusion-DPO (Wallace et al. 2023; methods.md section 2): preference pairs, a frozen reference.

For a pair (x0_w, x0_l) with one caption: one t ~ U{0..T-1} and one noise, shared by w and l;
per-sample MSEs of the policy and of the reference against the training target (the noise, or v);
logit = -beta/2 ((mse_w - mse_l) - (ref_mse_w - ref_mse_l)), loss = mean(-logsigmoid(logit)),
beta = 5000 (the official SDXL and SD1.5 launchers and diffusers' SDXL script).

The policy runs ONCE on the stacked [w; l] batch, the reference once more on the same stack
without gradients (run.reference(): the LoRA adapters disabled, or the frozen copy for full
fine-tuning). The loss head is spoxl.kernels.diffusion_dpo_loss (Triton on CUDA). At the start of
a LoRA run (B = 0) policy == reference, so the logit is 0 and the loss is log 2.

Data: data.path a .jsonl / .parquet in the Pick-a-Pic layout (spoxl.data.pairs), or null for a
small built-in synthetic pair set; cached with data.cache_dir like SFT (spoxl.methods._offline).
"""

from __future__ import annotations

from dataclasses import dataclass

from spoxl import kernels
from spoxl.engine.view import RunView
from spoxl.methods._offline import OfflineObjective, finite_number, stacked_pair_inputs


@dataclass
class DiffusionDPOConfig:
    beta: float = 5000.0  # KL weight; the ELBO constant T * omega(lambda_t) is absorbed in it
    # Debug/sanity mode: the same noise, timesteps and VAE sample at every step (see SFT).
    fixed_noise: bool = False

    def __post_init__(self):
        finite_number("method.beta", self.beta)


class DiffusionDPOObjective(OfflineObjective):
    name = "diffusion_dpo"
    needs_reference = True
    Config = DiffusionDPOConfig


    def loss(self, run: RunView, batch):
        *unet_inputs, target = stacked_pair_inputs(run, batch, self.noise)
        pred = run.unet_output(run.policy, *unet_inputs)
        with run.reference() as reference:
            ref_pred = run.unet_output(reference, *unet_inputs)
        pred_w, pred_l = pred.chunk(2)
        ref_w, ref_l = ref_pred.chunk(2)
        target_w, target_l = target.chunk(2)
        loss, metrics = kernels.diffusion_dpo_loss(pred_w, pred_l, ref_w, ref_l, target_w, target_l,
                                                   beta=self.config.beta, return_metrics=True)
        metrics["timestep"] = unet_inputs[1].float().mean()
        return loss, metrics


OBJECTIVE = DiffusionDPOObjective
