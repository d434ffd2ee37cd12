"""SPO: Step-aware Preference Optimization (methods.md section 1), online, on the engine's loop.

Its micro-batches come from the rollout stream (spoxl.spo.rollout: each round every rank samples
its prompts with the pool sampler and the current policy; the kept pairs are all-gathered,
shuffled once and dealt in equal shares). For each micro-batch of pairs, `loss` computes the policy
and reference DDIM means at x_t WITH CFG (as the official `train.cfg=True`), and kernels.spo_loss:

    r = clamp(exp(log p_theta(x_prev | x_t) - log p_ref(x_prev | x_t)), 1 - clip, 1 + clip)
    loss = mean(-logsigmoid(beta log r_w - beta log r_l))

The mean of a DDIM step does not depend on x_prev, so a pair whose w and l share x_t (every pair
of per-step branching, the first of each chunked segment) runs the UNet ONCE for both: the
micro-batch is reduced to its distinct sources, one policy call and one reference call per
micro-batch, CFG halves included.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch

from spoxl import kernels, sampling
from spoxl.errors import SpoxlError
from spoxl.engine.view import RunView
from spoxl.methods.base import Objective
from spoxl.models.text import PromptEmbeds, make_time_ids, negative_embeds
from spoxl.spo.pairs import PairBatch
from spoxl.spo.pool_sampler import PoolSampler, PoolSamplerConfig
from spoxl.spo.rollout import RolloutStream

DEFAULT_PROMPTS = ["a red circle", "a green square", "a blue cat", "a yellow dog"]


@dataclass
class PreferenceConfig:
    kind: str = "colour"  # "clip" (step-aware CLIP), "lrm" (LPO's latent reward model), "colour", ... (preference_models)
    path: Optional[str] = None  # clip: a local CLIPModel folder, or "tiny"; lrm: an LRM folder, or "toy"
    weights: Optional[str] = None  # clip: trained time-conditioning weights (safetensors)
    allow_untrained: bool = False  # clip without weights ignores t: an error unless this is set
    scale: float = 100.0  # programmatic scorers: score = scale * similarity (see spoxl.models.scorers)


@dataclass
class SPOConfig(PoolSamplerConfig):
    """The pool sampler's settings (steps, cfg_scale, eta, pool_size, num_inner_step,
    divert_start_step, threshold: declared and validated once, in PoolSamplerConfig) plus SPO's own."""

    # prompts: `prompt_file` (.txt one per line, .json/.jsonl strings or {"caption": ...}) or the list
    prompt_file: Optional[str] = None
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    prompts_per_rank: int = 2  # prompts each rank samples per round
    resolution: Optional[int] = None  # None: the model's native resolution
    # the loss (methods.md 1.4)
    beta: float = 10.0
    clip: float = 0.1
    train_cfg: bool = True  # policy/reference means with CFG, as in sampling
    # share one UNet call between w and l when they share x_t; False: the straightforward path
    share_sources: bool = True
    max_empty_rounds: int = 50  # rounds in a row without a single kept pair before giving up
    # Run length in passes over the prompt set (the official 10): no round starts past it, the
    # pairs left over are dropped and the run ends. The last round may sample up to
    # prompts_per_rank x ranks - 1 prompts of the next pass (a round is never cut short).
    # None: train.max_steps alone (the cap either way).
    epochs: Optional[int] = None
    # Passes over each round's pairs (as DDPO's train.num_inner_epochs; the official SPO code has no
    # such setting and trains each round's pairs once, as 1 does): every pair of a round is served in
    # E micro-batches (E orderings of the rank's share), so the sampling, which costs most of a round
    # on small models, is spent on E times as many updates. With train.grad_accum > 1 one optimizer
    # step may hold a pair twice (the end of one pass and the start of the next).
    num_inner_epochs: int = 1
    # A KL anchor on the steps SPO never trains (docs/spo.md "The early-step anchor"; not in the
    # official code). The LoRA's weights are shared by every timestep, so training only the steps
    # from divert_start_step on also moves the untrained early steps, unchecked. With a weight
    # w > 0, each micro-batch adds w x KL(policy || reference) of one DDIM(eta) step at an early
    # timestep: each pair's winner source x_t, taken up the forward process to a timestep drawn
    # uniformly from the grid's steps before divert_start_step. 0: off (the official SPO).
    anchor_weight: float = 0.0
    # How many of each micro-batch's pairs the anchor uses (the first N: pairs arrive shuffled, so
    # a random subset); null: all. The anchor costs a policy forward+backward and a reference
    # forward per pair it uses, as much as the SPO loss itself: on a small model on CPU a subset
    # keeps most of its pull for a fraction of that (an unbiased, noisier estimate of the same KL).
    anchor_pairs: Optional[int] = None
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def sampler_config(self) -> PoolSamplerConfig:
        """The sampler's part of these settings, as the sampler's own config."""
        return PoolSamplerConfig(**{f.name: getattr(self, f.name) for f in fields(PoolSamplerConfig)})


def read_prompts(cfg: SPOConfig) -> list[str]:
    """The round prompts: `prompt_file` (spoxl.data.prompts.load_prompts: .txt / .json / .jsonl,
    the official 4k_training_prompts.json layout included) or the inline list."""
    if cfg.prompt_file is not None:
        from spoxl.data.prompts import load_prompts

        return load_prompts(cfg.prompt_file)
    prompts = [p for p in cfg.prompts if p.strip()]
    if not prompts:
        raise SpoxlError("SPO has no prompts (method.prompts is empty and no method.prompt_file)")
    return prompts


# ---------------------------------------------------------------------------------------------
# Means at x_t for a micro-batch of pairs


@dataclass
class PairSources:
    """The UNet inputs of a micro-batch of pairs, gathered ONCE and shared by the policy and the
    reference (their means differ only in the model): one call per group, and where in the
    concatenated outputs each pair's winner and loser mean sits."""

    groups: list  # per UNet call: (x_t, t, a, a_prev, std, cond)
    w_index: torch.Tensor
    l_index: torch.Tensor


def pair_sources(pairs: PairBatch, *, scheduler, share_sources: bool = True, device=None) -> PairSources:
    """share_sources=True: one UNet call on the distinct sources (x_t_w, plus x_t_l where not
    shared). share_sources=False: the straightforward path, one call for all w and one for all l.
    The index work (nonzero, gathers, alpha lookups) happens here, not once per model."""
    device = device or pairs.x_w.device
    m = len(pairs)
    t = pairs.timestep.to(device)
    t_prev, std = pairs.prev_timestep.to(device), pairs.std.to(device)

    def group(x_t, idx):
        ti, ti_prev = t[idx], t_prev[idx]
        a = sampling.alpha_bar(scheduler, ti.cpu()).to(device)
        a_prev = sampling.alpha_bar(scheduler, ti_prev.cpu()).to(device)
        return (x_t, ti, a, a_prev, std[idx].float(), pairs.cond.index(idx.cpu()).to(device))

    every = torch.arange(m, device=device)
    if share_sources:
        unshared = (~pairs.shared.to(device)).nonzero().flatten()
        sources = torch.cat([pairs.x_t_w.to(device), pairs.x_t_l.to(device)[unshared]])
        src_idx = torch.cat([every, unshared])  # which pair each source serves
        l_index = every.clone()
        l_index[unshared] = m + torch.arange(len(unshared), device=device)
        return PairSources([group(sources, src_idx)], every, l_index)
    return PairSources([group(pairs.x_t_w.to(device), every), group(pairs.x_t_l.to(device), every)], every, every + m)


def pair_means(model, pairs, *, cfg_scale: float, uncond: PromptEmbeds, time_ids: torch.Tensor,
               prediction_type: str = "epsilon", dtype=torch.float32, scheduler=None, share_sources: bool = True,
               device=None):  # fmt: skip
    """(mean_w, mean_l) [M, C, H, W] fp32: the DDIM(eta) means of the winner and loser transitions
    under `model`. `pairs`: a PairBatch, or the PairSources made from it once (spo_pair_loss
    shares them between policy and reference). The sampler's eta enters only through the std
    stored with each pair (pairs.std)."""
    sources = pairs if isinstance(pairs, PairSources) else pair_sources(
        pairs, scheduler=scheduler, share_sources=share_sources, device=device)
    means = torch.cat([_means(model, *g, uncond, time_ids, cfg_scale, prediction_type, dtype) for g in sources.groups])
    return means[sources.w_index], means[sources.l_index]


def _means(model, x_t, t, a, a_prev, std, cond, uncond, time_ids, cfg_scale, prediction_type, dtype):
    n = x_t.shape[0]
    un = PromptEmbeds(uncond.embeds[:1].expand(n, -1, -1), uncond.pooled[:1].expand(n, -1)).to(x_t.device, dtype)
    out = sampling.guided_output(model, x_t.to(dtype), t, cond.to(x_t.device, dtype), un,
                                 time_ids[:1].expand(n, -1).to(x_t.device, dtype), cfg_scale)  # fmt: skip
    x0, eps = sampling.split_prediction(out, x_t, a, prediction_type)
    return sampling.ddim_mean(x0, eps, a_prev, std)


def spo_pair_loss(policy, reference_ctx, pairs: PairBatch, *, beta: float, clip: float, fused: bool = True, **kw):
    """(loss, metrics) of SPO on a micro-batch: policy means with grad, reference means without.

    `reference_ctx` is a context manager yielding the reference model (RunView.reference).
    fused=False uses the unfused torch loss (spoxl.kernels.losses.spo.reference) for the benchmark baseline.
    """
    sources = pair_sources(pairs, scheduler=kw.pop("scheduler"), share_sources=kw.pop("share_sources", True),
                           device=kw.pop("device", None))  # once for both models  # fmt: skip
    mean_w, mean_l = pair_means(policy, sources, **kw)
    with reference_ctx() as ref:
        ref_w, ref_l = pair_means(ref, sources, **kw)
    device = mean_w.device
    args = (pairs.x_w.to(device), pairs.x_l.to(device), mean_w, mean_l, ref_w.detach(), ref_l.detach(),
            pairs.std.to(device).float())  # fmt: skip
    if fused:
        return kernels.spo_loss(*args, beta=beta, clip=clip, return_metrics=True)
    from spoxl.kernels.losses import spo as spo_losses

    return spo_losses.reference(*args, beta=beta, clip=clip, return_metrics=True)


def anchor_kl(policy, reference_ctx, pairs: PairBatch, *, scheduler, steps: int, divert_start_step: int, eta: float,
              generator: torch.Generator | None, cfg_scale: float, uncond: PromptEmbeds, time_ids: torch.Tensor,
              prediction_type: str = "epsilon", dtype=torch.float32, device=None):  # fmt: skip
    """[M] per-element KL(policy || reference) of one DDIM(eta) step at an EARLY timestep (one
    SPO never trains), per pair: the early-step anchor (SPOConfig.anchor_weight).

    Each pair's winner source x_t (t from divert_start_step on) is taken UP the forward process to
    t' drawn uniformly from the grid's first divert_start_step timesteps (all > t):
        x_t' = sqrt(a_t' / a_t) x_t + sqrt(1 - a_t' / a_t) z,   z ~ N(0, I)
    (exact for the forward process, so x_t' is distributed as the policy's own x_t' would be if its
    late state were a clean sample's). Both transitions from x_t' are Gaussians with the same std,
    so the KL is |mu_policy - mu_ref|^2 / (2 std^2), averaged over latent elements like SPO's
    log-probs (spoxl.sampling.transition_logprob), so it is in the units of the loss's log-ratios.
    cfg_scale .. dtype: the model settings, as pair_means takes them.
    t' and z come from `generator` (the engine's per-rank, checkpointed stream), so a resumed run
    draws what the uninterrupted one did.
    """
    device = device or pairs.x_t_w.device
    early = sampling.inference_timesteps(scheduler, steps)[:divert_start_step].long()
    if len(early) == 0:
        raise SpoxlError("the early-step anchor needs steps before method.divert_start_step (it is 0)")
    gen_device = generator.device if generator is not None else device
    m = len(pairs)
    t_up = early[torch.randint(0, len(early), (m,), generator=generator, device=gen_device).cpu()]
    x_t = pairs.x_t_w.to(device).float()
    keep = (sampling.alpha_bar(scheduler, t_up) / sampling.alpha_bar(scheduler, pairs.timestep.cpu())).to(device)
    z = torch.randn(x_t.shape, generator=generator, device=gen_device).to(device)
    x_up = sampling.bcast(keep.sqrt(), x_t) * x_t + sampling.bcast((1 - keep).sqrt(), x_t) * z
    t_prev = sampling.prev_timestep(scheduler, t_up, steps)
    a, a_prev = sampling.alpha_bar(scheduler, t_up).to(device), sampling.alpha_bar(scheduler, t_prev).to(device)
    std = sampling.ddim_std(a, a_prev, eta).to(device)
    group = (x_up, t_up.to(device), a, a_prev, std, pairs.cond.to(device))
    unet_kw = dict(uncond=uncond, time_ids=time_ids, cfg_scale=cfg_scale, prediction_type=prediction_type, dtype=dtype)
    mean = _means(policy, *group, **unet_kw)
    with reference_ctx() as ref:
        ref_mean = _means(ref, *group, **unet_kw).detach()
    return ((mean - ref_mean) ** 2).flatten(1).mean(1) / (2 * std**2)


# ---------------------------------------------------------------------------------------------
# The objective


class SPOObjective(Objective):
    name = "spo"
    needs_reference = True
    Config = SPOConfig

    def __init__(self, config=None, recipe=None):
        super().__init__(config, recipe)
        self.rollout: RolloutStream | None = None  # built by setup()
        self._position = None  # a state loaded before setup()

    @classmethod
    def micro_step_unet_batch(cls, recipe) -> tuple[float, int | None]:  # fractional with anchor_pairs
        # Only the branching step's pair leaves ONE x_t (PairBatch.shared); the inner steps' winner
        # and loser continue from different latents: two source rows per pair at worst, doubled by
        # CFG's uncond half when the means are trained with guidance (pair_means).
        p = recipe.method.params
        cfg_rows = 2 if p.train_cfg and p.cfg_scale != 1.0 else 1
        sources = 1 if p.share_sources and p.num_inner_step == 0 else 2  # 0: every pair branches (shared)
        # anchor_kl: one more policy forward per anchored pair, alive until backward
        micro_batch = recipe.train.micro_batch_size
        anchored = 0 if p.anchor_weight <= 0 else min(p.anchor_pairs or micro_batch, micro_batch)
        return cfg_rows * (sources + anchored / micro_batch), p.resolution

    @classmethod
    def sampling_batch(cls, recipe) -> tuple[int, int]:
        # Each step denoises the pool's prompts_per_rank x pool_size candidates in one CFG call and
        # decodes them all for the preference model (PoolSampler.sample / score).
        # With branch_repeats R each prompt's state branches R times in the same calls.
        p = recipe.method.params
        pool = p.candidates(p.prompts_per_rank)
        return (2 if p.cfg_scale != 1.0 else 1) * pool, pool

    # ---- setup ---------------------------------------------------------------------------------

    def check(self, config) -> None:
        """Everything checkable before launch (spoxl train --dry-run): sampler settings, the
        loss settings, the prompts (file readable text, not empty)."""
        cfg = self.config
        try:
            cfg.sampler_config().validate()
        except SpoxlError as e:
            raise SpoxlError(f"method: {e}") from None
        if not 0 < cfg.clip < 1:
            raise SpoxlError(f"method.clip must be in (0, 1), got {cfg.clip}")
        if cfg.prompts_per_rank < 1:
            raise SpoxlError(f"method.prompts_per_rank must be >= 1, got {cfg.prompts_per_rank}")
        if cfg.num_inner_epochs < 1:  # the type (an integer) is the config loader's check
            raise SpoxlError(f"method.num_inner_epochs must be >= 1, got {cfg.num_inner_epochs}")
        if not cfg.anchor_weight >= 0:  # also refuses NaN
            raise SpoxlError(f"method.anchor_weight must be >= 0 (0: off), got {cfg.anchor_weight}")
        if cfg.anchor_weight > 0 and cfg.divert_start_step == 0:
            raise SpoxlError("method.anchor_weight anchors the steps before method.divert_start_step, and there are "
                             "none (divert_start_step is 0): set anchor_weight to 0 or branch later")
        if cfg.anchor_pairs is not None:
            if isinstance(cfg.anchor_pairs, bool) or not isinstance(cfg.anchor_pairs, int) or cfg.anchor_pairs < 1:
                raise SpoxlError(f"method.anchor_pairs must be a positive integer or null (all), got {cfg.anchor_pairs!r}")
            if not cfg.anchor_weight > 0:
                raise SpoxlError("method.anchor_pairs sets how many pairs the early-step anchor uses, and the anchor is "
                                 "off (method.anchor_weight is 0): set anchor_weight or drop anchor_pairs")
        if cfg.epochs is not None and (isinstance(cfg.epochs, bool) or not isinstance(cfg.epochs, int) or cfg.epochs < 1):
            raise SpoxlError(f"method.epochs must be a positive integer or null, got {cfg.epochs!r}")
        pc = cfg.preference
        if pc.kind in ("clip", "step_aware_clip") and not pc.weights and not pc.allow_untrained:
            raise SpoxlError("method.preference: kind 'clip' has no weights: an untrained step-aware CLIP ignores the "
                             "timestep; give method.preference.weights (from `spoxl train-preference-model`) or set "
                             "method.preference.allow_untrained: true for an experiment")
        if pc.kind == "lrm" and not pc.path and not pc.allow_untrained:
            raise SpoxlError("method.preference: kind 'lrm' needs a path (an LRM folder, or 'toy'); an untrained LRM "
                             "from the policy scores at random: set method.preference.allow_untrained: true for an experiment")
        read_prompts(cfg)

    def setup(self, run: RunView) -> None:
        from spoxl.imaging import default_resolution
        from spoxl.preference_models import MODEL_KINDS, build_preference_model

        cfg = self.config
        self.check(self.recipe)
        if run.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise SpoxlError(f"SPO cannot sample with prediction_type {run.prediction_type!r}")
        self.prompts = read_prompts(cfg)
        pc = cfg.preference
        extra = {"components": run.components} if pc.kind == "lrm" else {} if pc.kind in MODEL_KINDS else {"scale": pc.scale}
        self.scorer = build_preference_model(pc.kind, path=pc.path, weights=pc.weights, allow_untrained=pc.allow_untrained,
                                             **extra)  # fmt: skip
        if hasattr(self.scorer, "check_prompts"):
            self.scorer.check_prompts(self.prompts)  # every rank has every prompt: all fail alike
        if hasattr(self.scorer, "to"):
            self.scorer = self.scorer.to(run.device)
        comps = run.components
        self.resolution = cfg.resolution or default_resolution(comps)
        self.uncond = negative_embeds(comps, 1).to(run.device, torch.float32)  # zeros for SDXL base
        self.time_ids = make_time_ids(1, (self.resolution, self.resolution), device=run.device)
        self.sampler = PoolSampler(cfg.sampler_config(), comps.scheduler, comps.vae, self.scorer,
                                   prediction_type=run.prediction_type)  # fmt: skip
        self.rollout = RolloutStream(run, self.sampler, self.prompts, prompts_per_rank=cfg.prompts_per_rank,
                                     micro_batch_size=self.recipe.train.micro_batch_size, seed=self.recipe.run.seed,
                                     resolution=self.resolution, time_ids=self.time_ids, epochs=cfg.epochs,
                                     max_empty_rounds=cfg.max_empty_rounds,
                                     inner_epochs=cfg.num_inner_epochs)  # fmt: skip
        if self._position is not None:
            self.rollout.load_state_dict(self._position)

    # ---- data: the rollout stream (spoxl.spo.rollout) ------------------------------------------

    def micro_batches(self, run: RunView):
        return self.rollout

    def sample_round(self, run: RunView) -> PairBatch:
        """One sampling round of the stream (a collective on every rank)."""
        return self.rollout.sample_round()

    # The stream's position, read through the objective (what a checkpoint holds).
    round = property(lambda self: self.rollout.round)
    buffer = property(lambda self: self.rollout.buffer)
    leftover = property(lambda self: self.rollout.leftover)

    # ---- loss ----------------------------------------------------------------------------------

    def loss(self, run: RunView, batch: PairBatch):
        cfg = self.config
        loss, metrics = spo_pair_loss(
            run.policy, run.reference, batch, beta=cfg.beta, clip=cfg.clip,
            scheduler=run.components.scheduler,
            cfg_scale=cfg.cfg_scale if cfg.train_cfg else 1.0, uncond=self.uncond, time_ids=self.time_ids,
            prediction_type=run.prediction_type, share_sources=cfg.share_sources, device=run.device, dtype=run.dtype,
        )  # fmt: skip
        metrics = dict(metrics)
        if cfg.anchor_weight > 0:
            anchored = batch if cfg.anchor_pairs is None else batch.index(slice(0, cfg.anchor_pairs))
            kl = anchor_kl(run.policy, run.reference, anchored, scheduler=run.components.scheduler, steps=cfg.steps,
                           divert_start_step=cfg.divert_start_step, eta=cfg.eta, generator=run.generator,
                           device=run.device, cfg_scale=cfg.cfg_scale if cfg.train_cfg else 1.0, uncond=self.uncond,
                           time_ids=self.time_ids, prediction_type=run.prediction_type, dtype=run.dtype).mean()  # fmt: skip
            loss = loss + cfg.anchor_weight * kl
            metrics["anchor_kl"] = kl.detach()
        metrics["timestep"] = batch.timestep.float().mean()
        metrics["shared_frac"] = batch.shared.float().mean()
        return loss, metrics

    # ---- resume --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return self.rollout.state_dict() if self.rollout is not None else dict(self._position or {"round": 0})

    def load_state_dict(self, state: dict) -> None:
        if self.rollout is not None:
            self.rollout.load_state_dict(state)
        else:
            self._position = state


OBJECTIVE = SPOObjective
