"""Every seed a run uses, named and derived in one place.

A seed is a function of (run seed, purpose, rank, counter) and of nothing else (not of the step at
which a run was resumed, not of how many ranks share a node), so that a killed and resumed run
draws exactly what the uninterrupted one did, and two ranks never draw the same stream by accident.
The formulas are the ones spoxl has always used (changing one changes every run's numbers); new
purposes get their own multiplier here, never an inline `manual_seed(seed + something)`.

    purpose          rank  counter        who draws it
    WEIGHTS           -      -            building weights that must agree on every rank (LoRA init,
                                          the tiny model): ZeRO-3 partitions each rank's own copy
    RANK_STREAM       yes    -            the per-rank training generator (noise, timesteps, VAE
                                          samples; checkpointed) and the per-rank global RNG
    DATA_ORDER        -      epoch        the offline datasets' epoch permutation (same on every rank)
    SYNTHETIC_DATA    -      -            the built-in synthetic datasets
    AUGMENT           -      (epoch, i)   per-item crop/flip decisions (spoxl.data.images)
    PROMPT_ORDER      -      epoch        SPO's prompt permutation per pass over the prompt set
    ROUND_SAMPLING    yes    round        SPO's sampling noise of one round
    ROUND_SHUFFLE     -      round        SPO's shuffle of a round's gathered pairs (same on every rank)
    PAIR_REPLAY       -      (round, pass) SPO's order of a round's pairs in each replay, pass 1 .. E - 1
                                          (method.num_inner_epochs = E > 1; pass 0 is the order as dealt)
    SAMPLE_LATENTS    -      image        `spoxl sample`/eval starting noise, one generator per image
    SAMPLE_STEP_NOISE -      first image  the eta > 0 noise of one sampling batch
"""

from __future__ import annotations

import torch

WEIGHTS = "weights"
RANK_STREAM = "rank_stream"
DATA_ORDER = "data_order"
SYNTHETIC_DATA = "synthetic_data"
AUGMENT = "augment"
PROMPT_ORDER = "prompt_order"
ROUND_SAMPLING = "round_sampling"
ROUND_SHUFFLE = "round_shuffle"
PAIR_REPLAY = "pair_replay"
SAMPLE_LATENTS = "sample_latents"
SAMPLE_STEP_NOISE = "sample_step_noise"

_MASK = 2**63 - 1


def _augment(seed: int, epoch: int, index: int) -> int:
    # large odd constants, so nearby (seed, epoch, index) triples do not collide
    return (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + index * 0xC2B2AE3D) % _MASK


_DERIVE = {
    WEIGHTS: lambda seed, rank, counter: seed,
    RANK_STREAM: lambda seed, rank, counter: seed * 1000 + rank,
    DATA_ORDER: lambda seed, rank, counter: seed + counter,
    SYNTHETIC_DATA: lambda seed, rank, counter: seed,
    AUGMENT: lambda seed, rank, counter: _augment(seed, *counter),
    PROMPT_ORDER: lambda seed, rank, counter: seed * 7919 + counter,
    ROUND_SAMPLING: lambda seed, rank, counter: (seed * 1_000_003 + counter) * 4099 + rank,
    ROUND_SHUFFLE: lambda seed, rank, counter: seed + counter,
    PAIR_REPLAY: lambda seed, rank, counter: (seed * 0x27D4EB2F + counter[0] * 0x165667B1 + counter[1] * 0x9E3779B1) % _MASK,
    SAMPLE_LATENTS: lambda seed, rank, counter: seed + counter,
    SAMPLE_STEP_NOISE: lambda seed, rank, counter: seed + 1_000_003 + counter,
}
PURPOSES = tuple(_DERIVE)
# Which purposes depend on the rank (the others must agree on every rank).
PER_RANK = (RANK_STREAM, ROUND_SAMPLING)


def seed(purpose: str, run_seed: int, *, rank: int = 0, counter=0) -> int:
    """The seed of `purpose` for this (run seed, rank, counter)."""
    if purpose not in _DERIVE:
        raise ValueError(f"unknown seed purpose {purpose!r} (known: {', '.join(PURPOSES)})")
    return int(_DERIVE[purpose](int(run_seed), int(rank), counter))


def generator(purpose: str, run_seed: int, *, rank: int = 0, counter=0, device=None) -> torch.Generator:
    """A torch.Generator seeded for `purpose` (on `device`, CPU by default)."""
    gen = torch.Generator(device=device) if device is not None else torch.Generator()
    return gen.manual_seed(seed(purpose, run_seed, rank=rank, counter=counter))
