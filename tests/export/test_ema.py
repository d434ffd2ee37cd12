"""EMA math on a plain module (the ZeRO-3 case runs in test_zero3_launcher.py)."""

from __future__ import annotations

import pytest
import torch

from spoxl.engine.ema import EMA
from spoxl.errors import SpoxlError


def model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    m[0].requires_grad_(False)  # frozen parts are not tracked
    return m


def test_ema_decay_math_and_tracked_names():
    m = model()
    ema = EMA(m, decay=0.9)
    assert ema.names == ["1.weight", "1.bias"]
    start = m[1].weight.detach().clone()
    expected = start.clone()
    for k in range(3):
        with torch.no_grad():
            m[1].weight.add_(1.0 + k)
        ema.update(m, step=k + 1)
        expected = 0.9 * expected + 0.1 * m[1].weight.detach()
    torch.testing.assert_close(ema.shadow_params()["1.weight"], expected, rtol=0, atol=1e-6)
    assert ema.shadow["1.weight"].dtype == torch.float32 and ema.shadow["1.weight"].device.type == "cpu"
    assert not torch.allclose(expected, m[1].weight)  # it really lags


def test_ema_warmup_and_interval():
    m = model()
    ema = EMA(m, decay=0.999, warmup=True, every_n_steps=2)
    assert ema.current_decay() == pytest.approx(1 / 10)
    assert not ema.update(m, step=1) and ema.num_updates == 0
    before = ema.shadow["1.bias"].clone()
    with torch.no_grad():
        m[1].bias.fill_(5.0)
    assert ema.update(m, step=2)
    torch.testing.assert_close(ema.shadow["1.bias"], 0.1 * before + 0.9 * torch.full_like(before, 5.0))
    assert ema.current_decay() == pytest.approx(2 / 11)


def test_ema_state_dict_round_trip():
    m = model()
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        m[1].weight.mul_(3)
    ema.update(m)
    other = EMA(model(), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.5 and other.num_updates == 1
    torch.testing.assert_close(other.shadow["1.weight"], ema.shadow["1.weight"])
    offline = EMA.from_state_dict(ema.state_dict())
    torch.testing.assert_close(offline.shadow["1.bias"], ema.shadow["1.bias"])
    bad = ema.state_dict()
    bad["shadow"].pop("1.bias")
    with pytest.raises(SpoxlError, match="does not match"):
        other.load_state_dict(bad)


def test_ema_bad_settings():
    with pytest.raises(SpoxlError, match="decay"):
        EMA(model(), decay=1.0)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(SpoxlError, match="no trainable"):
        EMA(frozen)
