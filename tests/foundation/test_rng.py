"""spoxl.rng: every seed of a run named in one place. The values are the formulas spoxl's runs
have always drawn from (written out here by hand: a changed formula changes every run's numbers
and must fail), per-rank purposes differ between ranks, shared ones do not."""

import pytest
import torch

from spoxl import rng


@pytest.mark.parametrize("purpose, rank, counter, expected", [
    (rng.WEIGHTS, 3, 9, 42),
    (rng.RANK_STREAM, 3, 0, 42 * 1000 + 3),
    (rng.DATA_ORDER, 3, 5, 42 + 5),
    (rng.SYNTHETIC_DATA, 1, 0, 42),
    (rng.AUGMENT, 0, (2, 7), (42 * 0x9E3779B1 + 2 * 0x85EBCA77 + 7 * 0xC2B2AE3D) % (2**63 - 1)),
    (rng.PROMPT_ORDER, 1, 4, 42 * 7919 + 4),
    (rng.ROUND_SAMPLING, 1, 6, (42 * 1_000_003 + 6) * 4099 + 1),
    (rng.ROUND_SHUFFLE, 1, 6, 42 + 6),
    (rng.PAIR_REPLAY, 1, (6, 2), (42 * 0x27D4EB2F + 6 * 0x165667B1 + 2 * 0x9E3779B1) % (2**63 - 1)),
    (rng.SAMPLE_LATENTS, 0, 2, 44),
    (rng.SAMPLE_STEP_NOISE, 0, 8, 42 + 1_000_003 + 8),
])  # fmt: skip
def test_each_purpose_is_its_documented_formula(purpose, rank, counter, expected):
    assert rng.seed(purpose, 42, rank=rank, counter=counter) == expected


def test_per_rank_purposes_differ_between_ranks_and_shared_ones_do_not():
    for purpose in rng.PURPOSES:
        counter = (1, 2) if purpose in (rng.AUGMENT, rng.PAIR_REPLAY) else 3
        a, b = (rng.seed(purpose, 7, rank=r, counter=counter) for r in (0, 1))
        assert (a != b) == (purpose in rng.PER_RANK), purpose


def test_generators_draw_the_seeded_stream_and_unknown_purposes_fail():
    g = rng.generator(rng.ROUND_SAMPLING, 5, rank=1, counter=2)
    expected = torch.Generator().manual_seed((5 * 1_000_003 + 2) * 4099 + 1)
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=expected))
    with pytest.raises(ValueError, match="unknown seed purpose"):
        rng.seed("dropout", 1)


def test_no_run_code_seeds_a_generator_outside_rng():
    """The training run's seeds go through spoxl.rng: no inline manual_seed in the modules a run
    executes (engine, methods, spo rounds, data augmentation, sampling)."""
    from pathlib import Path

    root = Path(rng.__file__).parent
    for rel in ("engine/setup.py", "methods/_offline.py", "methods/spo.py", "data/images.py", "imaging.py"):
        assert "manual_seed(" not in (root / rel).read_text().replace("torch.manual_seed(rng.", ""), rel
