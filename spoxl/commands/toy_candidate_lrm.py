"""A toy LRM taught on the task LPO gives it: ranking the k candidates of ONE x_t.

`spoxl toy lrm --source candidates` (spoxl.commands.toy_lrm). The counterfactual toy LRM separates
different pictures well but ranks the candidates of one pool at chance (docs/lpo.md): they share
x_t and differ by one step's noise, a kind of pair it never saw. Here its training pairs are
exactly those: the toy model samples pools as SPO's sampler does (spoxl.spo.pool_sampler: DDIM
eta 1, CFG, k candidates per step from `divert_start_step`), the exact prompt-fidelity scorer judges
each candidate on its decoded predicted x0 (SPO's judge, which agrees with the finished images
92-100% of the time at the late steps), and the best and worst candidate x_{t-1} of each pool,
with the pool's t, are a pair. The LRM then learns to rank those latents at that t, the input LPO
gives it (lpo.md 3). This is a distillation of the exact scorer into the latent model, not the
paper's LRM recipe (Pick-a-Pic images noised at a shared t).
"""

from __future__ import annotations

import random

import torch

from spoxl.errors import SpoxlError
from spoxl.spo.pairs import PairBatch


@torch.no_grad()
def sample_candidate_pairs(components, captions: list[str], *, divert_start_step: int, pool_size: int = 4,
                           min_gap: float, pairs_per_pool: str = "best_worst", steps: int = 20, cfg_scale: float = 5.0,
                           batch: int = 8, seed: int = 0, progress: bool = True) -> tuple[PairBatch, list[str]]:  # fmt: skip
    """(pairs, their captions): every caption sampled once with per-step pools from
    `divert_start_step`, the best and worst candidate of each pool (pairs_per_pool "all": every two
    candidates) whose fidelity gap (the 2-way softmax of the two scores, as SPO's threshold) passes
    `min_gap`: near-ties, whose order is decided by noise in the predicted x0 as much as by the
    picture, are not taught.
    pairs.x_w / x_l are the candidates x_{t-1}, pairs.timestep the pool's t."""
    from tqdm.auto import tqdm

    from spoxl.models.text import encode_with_negative, make_time_ids
    from spoxl.spo.pool_sampler import PoolSampler, PoolSamplerConfig
    from spoxl.toy.scorers import ToyScorer

    config = PoolSamplerConfig(steps=steps, cfg_scale=cfg_scale, eta=1.0, pool_size=pool_size, num_inner_step=0,
                               divert_start_step=divert_start_step, threshold=min_gap,
                               pairs_per_pool=pairs_per_pool)  # fmt: skip
    sampler = PoolSampler(config, components.scheduler, components.vae, ToyScorer())
    gen = torch.Generator().manual_seed(seed)
    side = components.unet.config.sample_size
    kept, kept_captions = [], []
    for start in tqdm(range(0, len(captions), batch), desc="candidate pools", disable=not progress):
        prompts = captions[start : start + batch]
        cond, uncond = encode_with_negative(components, prompts)
        latents = torch.randn((len(prompts), components.unet.config.in_channels, side, side), generator=gen)
        result = sampler.sample(components.unet, prompts, cond, uncond, make_time_ids(len(prompts), (8 * side, 8 * side)),
                                latents, gen)  # fmt: skip
        if len(result.pairs):
            kept.append(result.pairs)
            kept_captions += [prompts[i] for i in result.pairs.prompt_index.tolist()]
    if not kept:
        raise SpoxlError(f"no pool of {len(captions)} captions had a best-worst gap above min_gap={min_gap}: lower it")
    return PairBatch.cat(kept), kept_captions


def pair_accuracy(model, pairs: PairBatch, captions: list[str], *, batch: int = 64) -> dict[int, float]:
    """How often the LRM scores the winner above the loser, per pool timestep."""
    right: dict[int, list[bool]] = {}
    model.eval()
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            part = pairs.index(slice(start, start + batch))
            prompts = captions[start : start + batch]
            s_w = model.score(part.x_w, prompts, part.timestep)
            s_l = model.score(part.x_l, prompts, part.timestep)
            for t, ok in zip(part.timestep.tolist(), (s_w > s_l).tolist()):
                right.setdefault(int(t), []).append(ok)
    return {t: sum(v) / len(v) for t, v in sorted(right.items(), reverse=True)}


def train_on_candidates(model, pairs: PairBatch, captions: list[str], *, steps: int, batch_size: int, lr: float,
                        weight_decay: float = 0.3, seed: int = 0, log=None) -> list[dict]:  # fmt: skip
    """The pairwise loss (spoxl.commands.train_preference_model.spm_loss, no ties) on candidate
    pairs, each scored at its pool's t; AdamW over the trainable parameters, gradient norm 1."""
    from spoxl.commands.train_preference_model import spm_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    order_rng = random.Random(seed)
    order: list[int] = []
    history = []
    for step in range(steps):
        if len(order) < batch_size:  # a fresh shuffled pass over the pairs
            fresh = list(range(len(pairs)))
            order_rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        part = pairs.index(torch.tensor(idx))
        model.train()
        loss, acc = spm_loss(model, part.x_w, part.x_l, [captions[i] for i in idx], part.timestep,
                             torch.zeros(len(idx), dtype=torch.bool))  # fmt: skip
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append({"loss": float(loss.detach()), "acc": float(acc)})
        if log is not None:
            log(step, history[-1])
    model.eval()
    return history
