"""What the pool-sampler test modules share: three prompts encoded by the tiny model, their
time ids and starting latents (the `setup` fixture), and a UNet wrapper that records the batch of
every forward call, so a test can count UNet rows."""

import pytest
import torch

from spoxl.models.text import encode_with_negative, make_time_ids

PROMPTS = ["a red circle", "a green square", "a blue cat"]


class CountingUNet(torch.nn.Module):
    """Wraps the UNet and counts forward calls (and the batch each call sees)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.batches = []

    def forward(self, x, *args, **kwargs):
        self.batches.append(x.shape[0])
        return self.unet(x, *args, **kwargs)


@pytest.fixture(scope="module")
def setup(tiny_components):
    """(components, cond, uncond, time_ids, latents) for PROMPTS at 64 px."""
    cond, uncond = encode_with_negative(tiny_components, PROMPTS)
    time_ids = make_time_ids(len(PROMPTS), (64, 64))
    latents = torch.randn((len(PROMPTS), 4, 8, 8), generator=torch.Generator().manual_seed(3))
    return tiny_components, cond, uncond, time_ids, latents
