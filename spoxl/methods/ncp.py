"""NCP: preference optimisation in Noise-Conditioned Perception space (Gambashidze et al. 2024;
methods.md section 4), default timestep mode `t-1`.

Per pair (x0_w, x0_l), one caption: a shared eps and a shared t ~ U{1..T-1}; x_t for both.
  * policy eps-hat on the stacked [w; l] (one forward, with grad); for kind 'dpo' the reference
    eps-hat too (run.reference(), no grad);
  * one DDPM posterior step to t-1 on the 1000-step grid (spoxl.sampling.ddpm_posterior, fixed_small
    variance) with ONE z shared by w, l and the three branches (z = 0 where t = 0, methods.md 4.1; with
    t >= 1 that never happens): from the policy's x0-hat, the reference's, and the TRUE x0 (the
    target x*_{t-1});
  * each x_{t-1} is embedded by a FROZEN copy of the base UNet's encoder conditioned on t-1 and the
    prompt (time embedding + SDXL text_time embedding, conv_in, every down block, and the mid block
    when use_middle_states);
  * spoxl.kernels.ncp_loss on the features: dpo -logsigmoid(beta (d_ref - d_theta)), cpo
    -logsigmoid(-beta d_theta), sft mean(mse_w), with d = mse_w - mse_l of feature MSEs.

The encoder's weights never train, but the policy branch is NOT run under no_grad: gradients flow
through it into x^theta_{t-1} and on into the policy's eps-hat. The reference and target branches
run under no_grad.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from spoxl import kernels
from spoxl.engine.view import RunView
from spoxl.errors import SpoxlError
from spoxl.kernels.losses.ncp import NCP_KINDS
from spoxl.methods._offline import OfflineObjective, encode_and_noise, finite_number
from spoxl.sampling import add_noise, added_conditioning, alpha_bar, bcast, ddpm_posterior, split_prediction

# The UNet parts the encoder needs (those that exist on the model are copied).
ENCODER_PARTS = ("time_proj", "time_embedding", "class_embedding", "add_time_proj", "add_embedding",
                 "encoder_hid_proj", "time_embed_act", "conv_in", "down_blocks")


@dataclass
class NCPConfig:
    kind: str = "dpo"  # dpo | cpo | sft (methods.md 4.2)
    beta: float = 2500.0  # the official launchers' value (= Diffusion-DPO's 5000 / 2)
    use_middle_states: bool = False  # also run the mid block (the SD1.5 scripts' --use_middle_states)
    encoder_loss_coeff: float = 1.0  # multiplies the per-sample perceptual MSEs (official default 1)
    # Debug/sanity mode: the same noise, timesteps, z and VAE sample at every step (see SFT).
    fixed_noise: bool = False
    # The frozen encoder and its x_{t-1} inputs: fp32 (default) or the run's precision. NCP's
    # signal x^theta_{t-1} - x*_{t-1} is -beta_t / (sqrt(alpha_t) sqrt(1 - abar_t)) (eps_hat - eps),
    # a coefficient of 0.004-0.012: bf16 rounding of x_{t-1} (~1.7e-3 RMS) is about its size.
    encoder_dtype: str = "fp32"

    def __post_init__(self):
        if self.encoder_dtype not in ("fp32", "compute"):
            raise SpoxlError(f"config: method.encoder_dtype must be fp32 or compute, got {self.encoder_dtype!r}")
        if self.kind not in NCP_KINDS:
            raise SpoxlError(f"config: method.kind must be one of {', '.join(NCP_KINDS)}, got {self.kind!r}")
        finite_number("method.beta", self.beta)
        finite_number("method.encoder_loss_coeff", self.encoder_loss_coeff)


class FrozenUNetEncoder(torch.nn.Module):
    """Deep copies of a UNet's encoder parts (embeddings, conv_in, down blocks, optional mid block),
    frozen, with any peft adapter in them switched off for good.

    Why a copy rather than the same UNet with adapters disabled (the other option for LoRA): the
    policy branch must backprop THROUGH the encoder, and under gradient checkpointing the down
    blocks re-run their forward during backward, when the adapters are enabled again, so the
    recomputation would not be the base encoder. A separate copy has no such state to toggle and
    works the same for full fine-tuning, where the UNet's own weights change. It is taken in
    setup(), before any optimizer step (and before a --resume loads trained weights), so it is the
    base model; LoRA B matrices are zero then and, in addition, disabled in the copy.
    """

    def __init__(self, unet, use_middle_states: bool):
        super().__init__()
        self.config = unet.config
        for name in ENCODER_PARTS:
            part = getattr(unet, name, None)
            setattr(self, name, copy.deepcopy(part) if isinstance(part, torch.nn.Module) else part)
        self.mid_block = copy.deepcopy(unet.mid_block) if use_middle_states else None
        self.use_middle_states = use_middle_states
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(False)
        self.requires_grad_(False)
        self.eval()

    def forward(self, sample, timestep, embeds, pooled, time_ids) -> torch.Tensor:
        from diffusers import UNet2DConditionModel as U

        # The embedding part of UNet2DConditionModel.forward, with diffusers' own methods.
        added = added_conditioning(pooled, time_ids) or {}  # {} for SD1.5: no added conditioning
        emb = self.time_embedding(U.get_time_embed(self, sample=sample, timestep=timestep), None)
        aug = U.get_aug_embed(self, emb=emb, encoder_hidden_states=embeds, added_cond_kwargs=added)
        if aug is not None:
            emb = emb + aug
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        hidden_states = U.process_encoder_hidden_states(self, encoder_hidden_states=embeds, added_cond_kwargs=added)
        h = self.conv_in(sample)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=hidden_states)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if self.mid_block is not None:
            if getattr(self.mid_block, "has_cross_attention", False):
                h = self.mid_block(h, emb, encoder_hidden_states=hidden_states)
            else:
                h = self.mid_block(h, emb)
        return h


class NCPObjective(OfflineObjective):
    name = "ncp"
    Config = NCPConfig
    # Full fine-tuning with kind 'dpo' needs the frozen reference copy; cpo / sft do not.
    needs_reference = property(lambda self: self.config.kind == "dpo")


    def setup(self, run: RunView) -> None:
        super().setup(run)
        if run.zero_stage == 3:
            raise SpoxlError("method ncp does not support ZeRO stage 3 yet (its frozen encoder copy "
                             "needs the UNet's unpartitioned weights): use ds_configs/zero2.json")
        self.encoder = FrozenUNetEncoder(run.unet, self.config.use_middle_states)
        self.encoder_dtype = torch.float32 if self.config.encoder_dtype == "fp32" else run.dtype
        if next(self.encoder.parameters()).dtype != self.encoder_dtype:
            self.encoder.to(self.encoder_dtype)

    def encode(self, run: RunView, x, t, embeds, pooled, time_ids) -> torch.Tensor:
        cast = lambda v: v.to(run.device, self.encoder_dtype)  # noqa: E731
        return self.encoder(cast(x), t.to(run.device), cast(embeds), cast(pooled), cast(time_ids))

    def loss(self, run: RunView, batch):
        c = self.config
        sched = run.components.scheduler
        batch, noise, t, a, z = encode_and_noise(run, batch, self.noise, latents_key="latents_w",
                                                 min_timestep=1, posterior_noise=True)
        two = lambda v: torch.cat([v, v])  # noqa: E731  (the same value for w and l)
        x0 = torch.cat([batch["latents_w"], batch["latents_l"]]).to(run.device, torch.float32)
        noise, z, t, a = two(noise), two(z), two(t), two(a)
        a_prev = alpha_bar(sched, (t - 1).cpu()).to(run.device)
        x_t = add_noise(x0, noise, a)
        cond = (two(batch["prompt_embeds"]), two(batch["pooled_prompt_embeds"]), two(batch["time_ids"]))

        z = z * bcast((t > 0).float(), z)  # methods.md 4.1: z = 0 at t = 0 (never, with t >= 1)

        def step(x0_hat):  # one DDPM posterior step to t-1 with the shared z
            mean, var = ddpm_posterior(x_t, x0_hat, a, a_prev)
            return mean + bcast(var.to(mean.device).sqrt(), mean) * z

        out = run.unet_output(run.policy, x_t, t, *cond)
        x_prev = step(split_prediction(out, x_t, a, run.prediction_type)[0])
        feat = self.encode(run, x_prev, t - 1, *cond)  # NOT no_grad: gradients flow through E
        ref_feat_w = ref_feat_l = None
        with torch.no_grad():
            if c.kind == "dpo":
                with run.reference() as reference:
                    ref_out = run.unet_output(reference, x_t, t, *cond)
                ref_feat_w, ref_feat_l = self.encode(
                    run, step(split_prediction(ref_out, x_t, a, run.prediction_type)[0]), t - 1, *cond).chunk(2)
            target_x0 = split_prediction(noise, x_t, a, "epsilon")[0]  # x*_{t-1}: from the TRUE eps
            target_feat = self.encode(run, step(target_x0), t - 1, *cond)
        feat_w, feat_l = feat.chunk(2)
        target_w, target_l = target_feat.chunk(2)
        if c.encoder_loss_coeff != 1.0:
            # mse(k f, k g) = k^2 mse(f, g): scale features by sqrt(coeff) to scale the MSEs by coeff.
            k = c.encoder_loss_coeff ** 0.5
            feat_w, feat_l, target_w, target_l = (k * v for v in (feat_w, feat_l, target_w, target_l))
            if ref_feat_w is not None:
                ref_feat_w, ref_feat_l = k * ref_feat_w, k * ref_feat_l
        loss, metrics = kernels.ncp_loss(feat_w, feat_l, ref_feat_w, ref_feat_l, target_w, target_l,
                                         beta=c.beta, kind=c.kind, return_metrics=True)
        metrics["timestep"] = t.float().mean()
        return loss, metrics


OBJECTIVE = NCPObjective
