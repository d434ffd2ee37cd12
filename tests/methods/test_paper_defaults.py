"""Every method's defaults against the published values, in one place (../shared/reference/methods.md).

A changed default (Diffusion-DPO's beta 5000 -> 50, SPO's clip, MaPO's snr) fails here, naming
the paper value it departs from."""

import pytest

from spoxl.methods.diffusion_dpo import DiffusionDPOConfig
from spoxl.methods.mapo import MaPOConfig
from spoxl.methods.ncp import NCPConfig
from spoxl.methods.spo import SPOConfig

PAPER = [
    # (config class, field, published value, where it is published)
    (SPOConfig, "beta", 10.0, "SPO train.beta (methods.md 1.4)"),
    (SPOConfig, "clip", 0.1, "SPO ratio clamp epsilon (methods.md 1.4)"),
    (SPOConfig, "threshold", 0.4, "SPO SDXL tau (methods.md 1.3)"),
    (SPOConfig, "pool_size", 2, "SPO SDXL num_sample_each_step (methods.md 1.2)"),
    (SPOConfig, "num_inner_step", 3, "SPO SDXL num_inner_step (methods.md 1.2)"),
    (SPOConfig, "divert_start_step", 4, "SPO divert_start_step (methods.md 1.2)"),
    (SPOConfig, "eta", 1.0, "SPO DDIM eta (methods.md 1.2)"),
    (SPOConfig, "cfg_scale", 5.0, "SPO CFG w (methods.md 1.4)"),
    (SPOConfig, "steps", 20, "SPO inference steps"),
    (DiffusionDPOConfig, "beta", 5000.0, "Diffusion-DPO SDXL/SD1.5 launchers (methods.md 2)"),
    (MaPOConfig, "beta", 0.1, "MaPO beta_mapo (methods.md 3)"),
    (MaPOConfig, "snr", 0.5, "MaPO snr_value (methods.md 3)"),
    (NCPConfig, "beta", 2500.0, "NCP launchers, = Diffusion-DPO's 5000 / 2 (methods.md 4)"),
    (NCPConfig, "kind", "dpo", "NCP default loss (methods.md 4.2)"),
]


@pytest.mark.parametrize("cls, field, value, source", PAPER, ids=[f"{c.__name__}.{f}" for c, f, _, _ in PAPER])
def test_default_is_the_published_value(cls, field, value, source):
    assert getattr(cls(), field) == value, f"{cls.__name__}.{field} default departs from {source}: {value}"
