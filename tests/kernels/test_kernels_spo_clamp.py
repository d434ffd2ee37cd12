"""SPO's ratio clamp at its edges: log-ratios placed just inside and just outside 1 +- clip.

Outside the clamp the sample contributes no gradient (torch.clamp's behaviour in the official
code); inside it does. Inputs are constructed so each pair's log-ratio equals a chosen value.
"""

import math

import pytest
import torch

import spoxl.kernels as K
from kernel_oracles import backend  # noqa: F401 (fixture)

CLIP = 0.1
GAP = 2e-3  # distance of the ratio from the clamp edge, far above fp32 rounding of the log-ratio


def _with_log_ratio(target: float, shape, std: float):
    """(x, mean, ref_mean) with mean[(x-ref)^2 - (x-mean)^2] / (2 std^2) == target, x != mean."""
    x = torch.randn(shape, dtype=torch.float64)
    d_mean = torch.randn(shape, dtype=torch.float64)
    direction = torch.randn(shape, dtype=torch.float64)
    # mean(d_ref^2) must equal 2 std^2 target + mean(d_mean^2).
    scale = math.sqrt((2 * std**2 * target + d_mean.pow(2).mean()) / direction.pow(2).mean())
    return x, x - d_mean, x - scale * direction


RATIOS = {
    "above_outside": 1 + CLIP + GAP,
    "above_inside": 1 + CLIP - GAP,
    "below_inside": 1 - CLIP + GAP,
    "below_outside": 1 - CLIP - GAP,
}


@pytest.mark.parametrize("side", ["w", "l"])
def test_gradient_is_zero_exactly_where_the_clamp_is_active(backend, side):
    shape, std = (4, 8, 8), 0.5
    names = list(RATIOS)
    built = [_with_log_ratio(math.log(RATIOS[n]), shape, std) for n in names]
    other = [_with_log_ratio(0.01, shape, std) for _ in names]  # the other side stays inside
    stack = lambda parts, i: torch.stack([p[i] for p in parts]).float()  # noqa: E731
    clamped_side = [stack(built, i) for i in range(3)]
    free_side = [stack(other, i) for i in range(3)]
    w, l = (clamped_side, free_side) if side == "w" else (free_side, clamped_side)
    mean_w, mean_l = w[1].requires_grad_(True), l[1].requires_grad_(True)
    loss, metrics = K.spo_loss(w[0], l[0], mean_w, mean_l, w[2], l[2], std, beta=10.0, clip=CLIP, return_metrics=True)
    loss.backward()
    grad = (mean_w if side == "w" else mean_l).grad.flatten(1).abs().amax(1)
    for i, name in enumerate(names):
        if name.endswith("outside"):
            assert float(grad[i]) == 0.0, f"{name}: gradient must be zero where the clamp is active"
        else:
            assert float(grad[i]) > 1e-6, f"{name}: gradient must flow inside the clamp"
    # The free side always gets gradient; 2 of the 8 ratios are clamped.
    free_grad = (mean_l if side == "w" else mean_w).grad.flatten(1).abs().amax(1)
    assert torch.all(free_grad > 1e-6)
    assert float(metrics["clamp_frac"]) == pytest.approx(2 / 8)
    log_ratio = metrics[f"log_ratio_{side}"]
    expected = sum(math.log(r) for r in RATIOS.values()) / 4
    assert float(log_ratio) == pytest.approx(expected, abs=1e-5)


def test_all_clamped_loss_is_constant(backend):
    """When every ratio is clamped the loss is -logsigmoid(beta log((1+c)/(1-c))) and has no gradient."""
    shape, std = (4, 4, 4), 0.3
    w = [_with_log_ratio(math.log(r), shape, std) for r in (1.5, 1.2)]
    l = [_with_log_ratio(math.log(r), shape, std) for r in (0.5, 0.85)]
    x_w, m_w, r_w = (torch.stack([p[i] for p in w]).float() for i in range(3))
    x_l, m_l, r_l = (torch.stack([p[i] for p in l]).float() for i in range(3))
    m_w.requires_grad_(True)
    m_l.requires_grad_(True)
    loss = K.spo_loss(x_w, x_l, m_w, m_l, r_w, r_l, std, beta=10.0, clip=CLIP)
    loss.backward()
    expected = -torch.nn.functional.logsigmoid(torch.tensor(10.0 * math.log((1 + CLIP) / (1 - CLIP))))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert float(m_w.grad.abs().max()) == 0.0 and float(m_l.grad.abs().max()) == 0.0
