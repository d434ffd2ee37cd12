"""The SPO step-wise pool sampler (methods.md 1.2-1.3).

DDIM with eta = 1 and CFG over N inference steps:

  1. steps 0 .. divert_start_step-1 are one plain stochastic trajectory per prompt (never trained;
     with branch_repeats R, 2-4 then run R times from each prompt's state, in the same calls);
  2. from then on the trajectory is cut into segments of 1 + num_inner_step steps (a last
     segment of one step folds into the one before, as the official sampler). At a segment
     start, k candidates are drawn from ONE x_t (kernels.pool_step: shared mean, k noises); each
     candidate then denoises on its own for num_inner_step more steps (chunked branching, the SDXL
     recipe: k = 2, 3 inner steps; num_inner_step = 0 is per-step branching, the SD1.5 recipe, k=4);
  3. at the end of a segment every candidate's predicted x0 (VAE-decoded for image scorers) is
     scored by the step-aware preference model AT THAT TIMESTEP (the final images at t = 0);
     best and worst form a pair if softmax(best, worst) gap > threshold, and then EVERY transition
     of the segment is kept for the winner chain and the loser chain (only the first shares x_t);
     with lookahead_steps L > 1 the judge sees instead where each candidate's predicted x0 leads:
     L deterministic DDIM jumps to t = 0 (lookahead_x0), judged at t = 0;
  4. the trajectory continues from a uniformly random candidate, drawn independently of the scores
     (the step-wise resampler), reusing that candidate's UNet output from the scoring call.

LPO's mode (`score_candidates`, lpo.md 3): per-step branching from the first step; the k
candidates x_{t-1} THEMSELVES are scored by a latent preference model (the LRM, input "latents")
conditioned on the CURRENT t: no x0 prediction, no VAE decode, and only the continued candidate
goes through the UNet next step. `threshold_max` makes the threshold grow linearly with the
step's DDIM(eta = 1) std, from `threshold` at the smallest std of the grid to `threshold_max` at
the largest (LPO's dynamic threshold, computed from the scheduler for any step count).

Batching: all prompts and all k candidates go through ONE UNet call per denoising step, with the
CFG halves in the same call (spoxl.sampling.guided_output). All diffusion math is spoxl.sampling's
and spoxl.kernels'; nothing is re-derived here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, get_args

import torch

from spoxl import kernels, sampling
from spoxl.errors import SpoxlError
from spoxl.models.text import PromptEmbeds
from spoxl.spo.pairs import PairBatch


# PoolSamplerConfig.pairs_per_pool: one pair per pool, or every pair; the tuple is the one list checks use
PairsPerPool = Literal["best_worst", "all"]
PAIRS_PER_POOL = get_args(PairsPerPool)
# PoolSamplerConfig.autocast: the half-precision dtypes a round may compute in (None: the run's)
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class PoolSamplerConfig:
    steps: int = 20
    cfg_scale: float = 5.0
    eta: float = 1.0
    pool_size: int = 2  # k candidates per branching
    num_inner_step: int = 3  # 0: per-step branching (SD1.5 recipe); 3: SDXL recipe
    divert_start_step: int = 4
    # How many independent branching phases continue from each prompt's plain trajectory at
    # divert_start_step (not in the official code, whose 1 is the default): R > 1 denoises the
    # untrained early steps once per prompt and branches from that state R times, each with its
    # own noises and continuations, so a round gives about R times the pairs for the early steps'
    # UNet calls of one. The R phases share their starting x_t, so their pairs are not independent.
    branch_repeats: int = 1
    threshold: float = 0.4  # softmax(best, worst) gap needed to keep a pair
    # Which pairs a pool gives: "best_worst" (the official SPO, one pair per pool) or "all": every
    # two candidates whose softmax gap beats the threshold, the better one as the winner (up to
    # k(k-1)/2 pairs from the same sampling cost; they share x_t, so they are not independent)
    pairs_per_pool: PairsPerPool = "best_worst"
    # What the preference model judges a candidate by: 1 = its predicted x0 at the next timestep,
    # judged at that timestep (the official SPO); L > 1 = the end of L deterministic DDIM (eta 0)
    # jumps from there down to t = 0 on a coarse grid, judged at t = 0 (L - 1 more UNet calls per
    # pool; the jumps are capped at the sampler's steps left, so a pool with one step left keeps
    # the predicted x0): for preference models that only judge final images well, such as the toy
    # world's exact scorers (docs/toy_world.md)
    lookahead_steps: int = 1
    # LPO (module docstring): score the candidates themselves at the current t, no decode
    score_candidates: bool = False
    # LPO's dynamic threshold: `threshold` at the grid's smallest DDIM(eta=1) std, this at the largest
    threshold_max: Optional[float] = None
    # The round's UNet and VAE calls under torch.autocast in this dtype ("bf16" | "fp16"; None: the
    # run's own precision; with fp16 the VAE decode stays in its own dtype, as SDXL's VAE overflows). Not in the official code. A round takes no gradients, and everything
    # that leaves a call (predictions, decoded images, samples, log-probs) is fp32; training
    # computes every log-prob again in the run's precision. So it only moves the sampled
    # distribution by the half-precision rounding of the model's outputs, for the speed of the
    # half-precision matmuls and convolutions (a CPU with AVX-512 BF16; any recent GPU).
    autocast: Optional[str] = None

    def candidates(self, prompts: int) -> int:
        """How many candidates one branching call holds for `prompts` prompts (the rows of the
        call before CFG doubles them, and the images it decodes)."""
        return prompts * self.branch_repeats * self.pool_size

    def validate(self) -> None:
        if self.steps < 1:
            raise SpoxlError(f"steps must be >= 1, got {self.steps}")
        if self.eta <= 0:
            raise SpoxlError(f"SPO needs eta > 0 (the transition log-prob is undefined at eta={self.eta})")
        if self.pool_size < 2:
            raise SpoxlError(f"pool_size must be >= 2 to form a pair, got {self.pool_size}")
        if self.num_inner_step < 0:
            raise SpoxlError(f"num_inner_step must be >= 0, got {self.num_inner_step}")
        if isinstance(self.branch_repeats, bool) or not isinstance(self.branch_repeats, int) or self.branch_repeats < 1:
            raise SpoxlError(f"branch_repeats must be a positive integer (1: branch once), got {self.branch_repeats!r}")
        if self.branch_repeats > 1 and self.divert_start_step == 0:
            raise SpoxlError("branch_repeats > 1 shares the steps before divert_start_step between the repeats, and "
                             "there are none (divert_start_step is 0): set branch_repeats to 1 or branch later")
        if not 0 <= self.divert_start_step < self.steps:
            raise SpoxlError(f"divert_start_step must be in [0, steps={self.steps}), got {self.divert_start_step}")
        if not 0 <= self.threshold < 1:
            raise SpoxlError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise SpoxlError(f"autocast must be one of {', '.join(AUTOCAST_DTYPES)} or null, got {self.autocast!r}")
        if self.pairs_per_pool not in PAIRS_PER_POOL:
            raise SpoxlError(f"pairs_per_pool must be one of {', '.join(PAIRS_PER_POOL)}, got {self.pairs_per_pool!r}")
        if self.threshold_max is not None and not self.threshold <= self.threshold_max < 1:
            raise SpoxlError(f"threshold_max must be in [threshold={self.threshold}, 1), got {self.threshold_max}")
        if self.lookahead_steps < 1:
            raise SpoxlError(f"lookahead_steps must be >= 1 (1: the predicted x0), got {self.lookahead_steps}")
        if self.score_candidates and self.lookahead_steps != 1:
            raise SpoxlError("score_candidates (LPO) judges the candidates themselves: lookahead_steps must be 1, "
                             f"got {self.lookahead_steps}")
        if self.score_candidates and self.num_inner_step != 0:
            raise SpoxlError("score_candidates (LPO) branches at every step: num_inner_step must be 0, "
                             f"got {self.num_inner_step}")


@dataclass
class RoundResult:
    pairs: PairBatch
    accepted: dict[int, int] = field(default_factory=dict)  # segment-start timestep -> pools that gave a pair
    offered: dict[int, int] = field(default_factory=dict)  # segment-start timestep -> prompts scored
    # B below: the prompts times branch_repeats (each repeat is a row of its own)
    final_scores: torch.Tensor | None = None  # [B, k] preference scores of the final images (t = 0)
    final_latents: torch.Tensor | None = None  # [B, C, H, W] the randomly continued chain's result
    choices: list[torch.Tensor] = field(default_factory=list)  # [B] continuation index per segment
    unet_calls: int = 0

    def acceptance(self) -> dict[int, float]:
        return {t: self.accepted[t] / max(1, self.offered[t]) for t in self.offered}


def segments(steps: int, divert_start_step: int, num_inner_step: int) -> list[tuple[int, int]]:
    """The branching segments [start, end) of one trajectory: a pool at `start`, then each chain
    alone until `end`. As the official sampler, a final segment of ONE step is not branched: when
    (steps - divert) % (1 + inner) == 1 that step folds into the previous segment, whose chains
    take it before being scored at t = 0 (the official pipeline's last-step branch)."""
    starts = list(range(divert_start_step, steps, 1 + num_inner_step))
    if len(starts) > 1 and (steps - divert_start_step) % (1 + num_inner_step) == 1:
        starts.pop()
    ends = starts[1:] + [steps]
    return list(zip(starts, ends))


def _seed(generator: torch.Generator | None) -> int:
    """A kernel seed drawn from the sampler's generator (reproducible, one stream per run)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def step_thresholds(scheduler, steps: int, low: float, high: float) -> dict[int, float]:
    """LPO's dynamic threshold per grid timestep t (the timestep the pool branches at):
    low + (high - low) (sigma_t - sigma_min) / (sigma_max - sigma_min), sigma_t the DDIM(eta = 1)
    std of the step from t, min and max over the grid. The official code hard-codes sigma for
    SDXL's 20-step grid (0.0206 at t = 1 ... 0.6444 at t = 951); this computes it for any grid."""
    ts = [int(t) for t in sampling.inference_timesteps(scheduler, steps)]
    sigma = {t: float(sampling.ddim_std(sampling.alpha_bar(scheduler, t),
                                        sampling.alpha_bar(scheduler, sampling.prev_timestep(scheduler, t, steps)), 1.0))
             for t in ts}  # fmt: skip
    lo, hi = min(sigma.values()), max(sigma.values())
    span = (hi - lo) or 1.0  # one step: the grid's only sigma is both ends
    return {t: low + (high - low) * (s - lo) / span for t, s in sigma.items()}


def pair_gap(best: torch.Tensor, worst: torch.Tensor) -> torch.Tensor:
    """softmax([best, worst])[0] - softmax([best, worst])[1] per prompt (methods.md 1.3)."""
    probs = torch.softmax(torch.stack([best.float(), worst.float()], dim=-1), dim=-1)
    return probs[..., 0] - probs[..., 1]


def lookahead_grid(t: int, jumps: int) -> list[int]:
    """The coarse grid of a lookahead from t: jumps + 1 distinct timesteps, evenly spaced from t
    down to 0."""
    if not 1 <= jumps <= t:
        raise SpoxlError(f"a lookahead from t={t} takes 1 to {t} jumps, got {jumps}")
    return [round(t * (jumps - i) / jumps) for i in range(jumps + 1)]


def lookahead_x0(denoise, scheduler, t: int, x0: torch.Tensor, eps: torch.Tensor, jumps: int) -> torch.Tensor:
    """Latents at t = 0 reached by `jumps` deterministic DDIM (eta 0) jumps on lookahead_grid(t,
    jumps) from the UNet's (x0, eps) at t (the pool sampler has them already: they also continue
    the chain): jumps - 1 more calls of denoise(x, t) -> (x0, eps); the last jump lands on the
    predicted x0 of the last grid point above 0."""
    for t_next in lookahead_grid(t, jumps)[1:-1]:
        x = sampling.ddim_mean(x0, eps, sampling.alpha_bar(scheduler, t_next).to(x0.device), 0.0)
        x0, eps = denoise(x, t_next)
    return x0


class PoolSampler:
    """Samples one SPO round for a batch of prompts and returns the kept transition pairs."""

    def __init__(self, config: PoolSamplerConfig, scheduler, vae, scorer, *, prediction_type: str = "epsilon"):
        config.validate()
        if config.score_candidates and getattr(scorer, "input", "images") != "latents":
            raise SpoxlError(f"score_candidates (LPO) scores noisy latents: the preference model "
                             f"{type(scorer).__name__} takes {getattr(scorer, 'input', 'images')} (use a latent reward model)")
        self.config = config
        self.scheduler = scheduler
        self.vae = vae
        self.scorer = scorer
        self.prediction_type = prediction_type
        self.thresholds = (step_thresholds(scheduler, config.steps, config.threshold, config.threshold_max)
                           if config.threshold_max is not None else None)  # fmt: skip

    def threshold(self, t: int) -> float:
        """The softmax gap a pool branching at t must exceed to give a pair."""
        return self.config.threshold if self.thresholds is None else self.thresholds[t]

    # ---- pieces --------------------------------------------------------------------------------

    def _prev(self, t: int) -> int:
        """The next timestep on the inference grid (negative after the last step)."""
        return int(sampling.prev_timestep(self.scheduler, t, self.config.steps))

    def _alpha(self, t: int):
        """(alpha_bar at t, alpha_bar at the next grid timestep)."""
        return sampling.alpha_bar(self.scheduler, t), sampling.alpha_bar(self.scheduler, self._prev(t))

    def _autocast(self, device: torch.device, vae: bool = False):
        """config.autocast's context for a model call (a no-op when it is None). The VAE decode is
        never run in fp16: SDXL's VAE overflows there (why model.vae_dtype defaults to fp32)."""
        dtype = AUTOCAST_DTYPES.get(self.config.autocast)
        if vae and dtype == torch.float16:
            dtype = None
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def _denoise(self, unet, x, t, cond, uncond, time_ids, dtype):
        """(pred_x0, pred_eps) in fp32 for the whole batch: ONE UNet call (CFG halves included;
        guided_output combines them in fp32)."""
        a = sampling.alpha_bar(self.scheduler, t).to(x.device)
        with self._autocast(x.device):
            out = sampling.guided_output(unet, x.to(dtype), t, cond, uncond, time_ids, self.config.cfg_scale)
        return sampling.split_prediction(out, x, a, self.prediction_type)

    @torch.no_grad()
    def score(self, x0: torch.Tensor, prompts: list[str], t: int) -> torch.Tensor:
        """Preference scores of predicted-x0 latents (decoded first for image scorers, in fp32)."""
        inputs = x0
        if getattr(self.scorer, "input", "images") == "images":
            with self._autocast(x0.device, vae=True):
                inputs = sampling.decode_latents(self.vae, x0)  # returns fp32
        return self.scorer.score(inputs, prompts, t).float().to(x0.device)

    # ---- one round ---------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        unet,
        prompts: list[str],
        cond: PromptEmbeds,
        uncond: PromptEmbeds,
        time_ids: torch.Tensor,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> RoundResult:
        c = self.config
        k, B = c.pool_size, len(prompts)
        if latents.shape[0] != B or len(cond) != B:
            raise SpoxlError(f"pool sampler: {B} prompts but {latents.shape[0]} latents / {len(cond)} embeddings")
        dtype = next(unet.parameters()).dtype
        timesteps = [int(t) for t in sampling.inference_timesteps(self.scheduler, c.steps)]
        result = RoundResult(pairs=None)
        calls = 0

        def denoise(x, t, n):  # n: how many copies of each prompt are in x
            nonlocal calls
            calls += 1
            rep = lambda e: e if n == 1 else e.repeat_interleave(n)  # noqa: E731
            ids = time_ids if n == 1 else time_ids.repeat_interleave(n, 0)
            return self._denoise(unet, x, t, rep(cond), rep(uncond), ids, dtype)

        x = latents.float()
        # 1. the plain stochastic trajectory before branching.
        for i in range(c.divert_start_step):
            t = timesteps[i]
            a, a_prev = self._alpha(t)
            _, eps = denoise(x, t, 1)
            x = kernels.pool_step(x, eps, a, a_prev, c.eta, 1, seed=_seed(generator))[0][:, 0].float()

        # 2-4. segments: branch at `start`, inner steps, score at the end, keep pairs, continue.
        _, eps = denoise(x, timesteps[c.divert_start_step], 1)
        origin = torch.arange(B)  # each row's prompt in the caller's list (pairs report it)
        if c.branch_repeats > 1:  # R branching phases from each state: rows prompt-major, R per prompt
            R = c.branch_repeats
            x, eps, origin = x.repeat_interleave(R, 0), eps.repeat_interleave(R, 0), origin.repeat_interleave(R)
            cond, uncond = cond.repeat_interleave(R), uncond.repeat_interleave(R)
            time_ids = time_ids.repeat_interleave(R, 0)  # denoise() reads these three at call time
            prompts = [p for p in prompts for _ in range(R)]
            B = B * R
        kept: list[PairBatch] = []
        prompts_k = [p for p in prompts for _ in range(k)]
        arange = torch.arange(B)
        final_scores = None
        for start, end in segments(c.steps, c.divert_start_step, c.num_inner_step):
            t = timesteps[start]
            a, a_prev = self._alpha(t)
            # The k candidates and their log-probs under the policy mean (the sampler has no
            # reference) from one kernel: a DDIM candidate's log-prob needs only its noise and std.
            samples, mean, std, logp = kernels.pool_step(x, eps, a, a_prev, c.eta, k, seed=_seed(generator),
                                                         return_logprob=True)  # fmt: skip
            samples = samples.float()
            # Each record: (x_t [B, k], x_prev [B, k], t, t_prev, std [B], logp [B, k]).
            records = [(x.unsqueeze(1).expand_as(samples), samples, t, self._prev(t), std, logp)]
            cur = samples.reshape(B * k, *x.shape[1:])
            if c.score_candidates:  # LPO: the candidates x_{t-1} themselves, at the current t
                scores = self.scorer.score(cur, prompts_k, t).float().view(B, k).cpu()
                x = self._select(result, kept, records, scores, t, cond, generator, cur.view(B, k, *x.shape[1:]))
                if end < c.steps:  # only the continued candidate goes through the UNet
                    _, eps = denoise(x, timesteps[end], 1)
                else:
                    final_scores = scores
                continue
            for j in range(start + 1, end):  # inner steps: every chain on its own
                tj = timesteps[j]
                aj, aj_prev = self._alpha(tj)
                _, eps_j = denoise(cur, tj, k)
                nxt, mean_j, std_j, logp_j = kernels.pool_step(cur, eps_j, aj, aj_prev, c.eta, 1, seed=_seed(generator),
                                                               return_logprob=True)  # fmt: skip
                nxt = nxt[:, 0].float()
                logp_j = logp_j[:, 0]
                records.append(
                    (cur.view(B, k, *x.shape[1:]), nxt.view(B, k, *x.shape[1:]), tj, self._prev(tj),
                     std_j.view(B, k)[:, 0], logp_j.view(B, k))
                )  # fmt: skip
                cur = nxt
            if end < c.steps:  # score the predicted x0 at the next timestep; its eps continues the chain
                t_score = timesteps[end]
                x0, eps_all = denoise(cur, t_score, k)
                # never more jumps than the sampler has steps (or the grid has timesteps) left
                jumps = min(c.lookahead_steps, c.steps - end, t_score)
                if jumps > 1:  # judge the end of a short deterministic rollout instead
                    x0 = lookahead_x0(lambda y, tj: denoise(y, tj, k), self.scheduler, t_score, x0, eps_all, jumps)
                    t_score = 0
            else:  # the final latents are the images; the preference model sees t = 0
                t_score, x0, eps_all = 0, cur, None
            scores = self.score(x0, prompts_k, t_score).view(B, k).cpu()  # tiny; selection on the host
            x = self._select(result, kept, records, scores, t, cond, generator, cur.view(B, k, *x.shape[1:]))
            if eps_all is not None:
                choice = result.choices[-1]
                eps = eps_all.view(B, k, *x.shape[1:])[arange, choice]
            else:
                final_scores = scores
        result.pairs = PairBatch.cat(kept) if kept else self._no_pairs(x, cond)
        result.pairs.prompt_index = origin[result.pairs.prompt_index]
        result.final_scores = final_scores
        result.final_latents = x
        result.unet_calls = calls
        return result

    def pool_pairs(self, scores: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt, winner, loser) candidate indices of the pairs the pools [B, k] of scores give
        at t, prompt-major: each pool's best/worst pair when their softmax gap beats the threshold
        (pairs_per_pool "best_worst"), or every two candidates whose gap does ("all")."""
        B = scores.shape[0]
        if self.config.pairs_per_pool == "all":
            hi = scores[:, :, None].expand(-1, -1, scores.shape[1])  # [B, k, k]: candidate i against j
            lo = scores[:, None, :].expand_as(hi)
            ok = (hi > lo) & (pair_gap(hi, lo) > self.threshold(t))
            return ok.nonzero(as_tuple=True)
        arange = torch.arange(B)
        best, worst = scores.argmax(1), scores.argmin(1)
        gap = pair_gap(scores[arange, best], scores[arange, worst])
        idx = ((gap > self.threshold(t)) & (best != worst)).nonzero().flatten()
        return idx, best[idx], worst[idx]

    def _select(self, result: RoundResult, kept: list, records, scores, t: int, cond, generator, chains):
        """Keep the pairs of each prompt's pool (pool_pairs), then continue every prompt from a
        uniformly random candidate (drawn whatever the scores are: the step-wise resampler).
        Returns the continued latents [B, ...]. `accepted` counts pools that gave a pair."""
        B, k = scores.shape
        idx, w, l = self.pool_pairs(scores, t)
        result.offered[t] = result.offered.get(t, 0) + B
        result.accepted[t] = result.accepted.get(t, 0) + len(set(idx.tolist()))
        if len(idx):
            kept.append(self._pairs(records, idx, w, l, cond))
        choice = torch.randint(0, k, (B,), generator=generator)
        result.choices.append(choice)
        return chains[torch.arange(B), choice]

    def _pairs(self, records, idx, w, l, cond: PromptEmbeds) -> PairBatch:
        """The winner (candidate w) and loser (candidate l) transitions of prompts idx, for every
        record of the segment."""
        out = []
        n = len(idx)
        for r, (x_t, x_prev, t, t_prev, std, logp) in enumerate(records):
            out.append(
                PairBatch(
                    x_t_w=x_t[idx, w].clone(),
                    x_t_l=x_t[idx, l].clone(),
                    x_w=x_prev[idx, w].clone(),
                    x_l=x_prev[idx, l].clone(),
                    timestep=torch.full((n,), t, dtype=torch.long),
                    prev_timestep=torch.full((n,), t_prev, dtype=torch.long),
                    std=std[idx].float().cpu().reshape(n),
                    shared=torch.full((n,), r == 0, dtype=torch.bool),  # only the branching step shares x_t
                    logp_w=logp[idx, w].float(),
                    logp_l=logp[idx, l].float(),
                    embeds=cond.embeds[idx],
                    pooled=cond.pooled[idx],
                    prompt_index=idx.clone(),
                )
            )
        return PairBatch.cat([p.to("cpu") for p in out])

    @staticmethod
    def _no_pairs(x, cond: PromptEmbeds) -> PairBatch:
        z = lambda *s, **kw: torch.zeros((0, *s), **kw)  # noqa: E731
        lat = z(*x.shape[1:])
        return PairBatch(
            x_t_w=lat, x_t_l=lat, x_w=lat, x_l=lat,
            timestep=z(dtype=torch.long), prev_timestep=z(dtype=torch.long), std=z(),
            shared=z(dtype=torch.bool), logp_w=z(), logp_l=z(),
            embeds=z(*cond.embeds.shape[1:]), pooled=z(*cond.pooled.shape[1:]), prompt_index=z(dtype=torch.long),
        )  # fmt: skip
