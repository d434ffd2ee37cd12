"""The training data SPO collects: transition pairs (x_t, t, x_w, x_l) and how they move.

A pair is one winner transition x_t^w -> x_w and one loser transition x_t^l -> x_l at the same
timestep t (same DDIM std). With per-step branching every pair shares its source (x_t^w is x_t^l);
with chunked branching (SDXL recipe) only the first transition of a segment does, the inner-step
transitions of the winner and loser chains start from different x_t. `shared` records which.

Across ranks the pairs are all-gathered and re-dealt with one permutation drawn on rank 0 (the
official recipe, see docs/spo.md for why): every rank then trains on the same number of pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from spoxl.models.text import PromptEmbeds


@dataclass
class PairBatch:
    x_t_w: torch.Tensor  # [M, C, H, W] source of the winner transition
    x_t_l: torch.Tensor  # [M, C, H, W] source of the loser transition (== x_t_w where shared)
    x_w: torch.Tensor  # [M, C, H, W] winner x_{t-1}
    x_l: torch.Tensor  # [M, C, H, W] loser x_{t-1}
    timestep: torch.Tensor  # [M] long, source timestep t
    prev_timestep: torch.Tensor  # [M] long, the next timestep on the grid (may be < 0 at the end)
    std: torch.Tensor  # [M] fp32, the DDIM(eta) std of the transition
    shared: torch.Tensor  # [M] bool, x_t_w is x_t_l (one UNet call serves both)
    logp_w: torch.Tensor  # [M] fp32, log-prob of x_w under the SAMPLING policy (diagnostics, tests)
    logp_l: torch.Tensor  # [M]
    embeds: torch.Tensor  # [M, L, D] prompt embeddings (conditional half of CFG)
    pooled: torch.Tensor  # [M, P]
    prompt_index: torch.Tensor  # [M] long, index of the prompt in its sampling round (per rank)

    def __len__(self) -> int:
        return self.x_w.shape[0]

    @property
    def cond(self) -> PromptEmbeds:
        return PromptEmbeds(self.embeds, self.pooled)

    def index(self, idx) -> "PairBatch":
        return PairBatch(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    def to(self, device) -> "PairBatch":
        return PairBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @staticmethod
    def cat(items: list["PairBatch"]) -> "PairBatch":
        return PairBatch(**{f.name: torch.cat([getattr(p, f.name) for p in items]) for f in fields(PairBatch)})

    @staticmethod
    def empty_like(template: "PairBatch") -> "PairBatch":
        return template.index(slice(0, 0))

    def state(self) -> dict:
        """Plain tensors (CPU) for checkpoints."""
        return {f.name: getattr(self, f.name).detach().cpu() for f in fields(self)}

    @staticmethod
    def from_state(state: dict) -> "PairBatch":
        return PairBatch(**{f.name: state[f.name] for f in fields(PairBatch)})


# ---------------------------------------------------------------------------------------------
# Across ranks


def all_gather_pairs(pairs: PairBatch, device) -> PairBatch:
    """Every rank's pairs, concatenated in rank order, on every rank (variable counts per rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return pairs
    world = dist.get_world_size()
    count = torch.tensor([len(pairs)], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    most = max(counts)
    out = {}
    for f in fields(PairBatch):
        t = getattr(pairs, f.name).to(device)
        is_bool = t.dtype == torch.bool
        if is_bool:  # not every backend gathers bools
            t = t.to(torch.uint8)
        # all_gather needs equal shapes: pad every rank to the largest count, then cut.
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=device)
        padded[: len(pairs)] = t
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        out[f.name] = torch.cat([g[:c] for g, c in zip(gathered, counts)])
        if is_bool:
            out[f.name] = out[f.name].bool()
    return PairBatch(**out)


def shared_permutation(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """A permutation of range(n) drawn on rank 0 and broadcast, so every rank deals the same way."""
    import torch.distributed as dist

    perm = torch.randperm(n, generator=generator).to(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(perm, src=0)
    return perm


def deal(pairs: PairBatch, perm: torch.Tensor, rank: int, world: int, multiple: int):
    """(this rank's slice, the leftover) of the shuffled pairs.

    Every rank gets the same number of pairs, a multiple of `multiple` (micro-batch size), so every
    rank runs the same number of forwards (ZeRO-3). The few pairs that do not fit (fewer than
    world * multiple) are returned as the leftover, identical on every rank, for the next round.
    """
    per_rank = (len(perm) // world) // multiple * multiple
    perm = perm.cpu()
    mine = perm[rank * per_rank : (rank + 1) * per_rank]
    return pairs.index(mine), pairs.index(perm[world * per_rank :])
