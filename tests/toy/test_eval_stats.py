"""spoxl.evaluation's paired figures against hand-computed values."""

import math

import pytest
import torch

from spoxl.errors import SpoxlError
from spoxl.evaluation import paired_stats, wilson_interval


def test_wilson_interval_hand_computed():
    # p = 0.8, n = 10, z = 1.96: centre = (0.8 + 0.19208) / 1.38416 = 0.716739,
    # half = 1.96 * sqrt(0.016 + 3.8416 / 400) / 1.38416 = 0.226581
    low, high = wilson_interval(0.8, 10)
    assert low == pytest.approx(0.716739 - 0.226581, abs=1e-5)
    assert high == pytest.approx(0.716739 + 0.226581, abs=1e-5)
    assert wilson_interval(1.0, 20)[1] == 1.0 and wilson_interval(1.0, 20)[0] == pytest.approx(0.83887, abs=1e-4)
    assert all(math.isnan(v) for v in wilson_interval(0.5, 0))


def test_paired_stats_hand_computed_with_a_tie():
    base = torch.tensor([1.0, 2.0, 3.0, 4.0])
    tuned = torch.tensor([2.0, 2.0, 5.0, 3.0])  # diffs +1, 0 (tie), +2, -1
    s = paired_stats(base, tuned)
    assert s["base_mean"] == 2.5 and s["mean"] == 3.0 and s["diff_mean"] == 0.5 and s["n"] == 4
    # sample std of (1, 0, 2, -1) = sqrt(5/3); s.e. = that / 2
    assert s["diff_stderr"] == pytest.approx(math.sqrt(5 / 3) / 2)
    assert s["win_rate"] == pytest.approx(2.5 / 4)  # two wins, one tie counted half
    assert s["win_rate_ci95"] == pytest.approx(list(wilson_interval(0.625, 4)))


def test_paired_stats_is_directional():
    base = torch.zeros(10)
    worse = paired_stats(base, -torch.arange(1.0, 11.0))
    assert worse["win_rate"] == 0.0 and worse["diff_mean"] == -5.5


def test_paired_stats_rejects_mismatched_vectors():
    with pytest.raises(SpoxlError, match="equal"):
        paired_stats(torch.zeros(3), torch.zeros(4))
