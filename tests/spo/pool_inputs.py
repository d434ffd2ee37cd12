"""What the SPO test modules share: three prompts encoded by the tiny model, their time ids and
starting latents (the `setup` fixture), a UNet wrapper that records the batch of every forward
call, so a test can count UNet rows, a LoRA policy that differs from its reference
(`lora_policy`) and the pairs of one sampling round (`sample_round_pairs`)."""

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


def lora_policy(unet) -> torch.nn.Module:
    """A LoRA'd copy of `unet` whose B matrices are random: a policy that differs from its
    reference (the same module with adapters disabled), so log-ratios and KLs are not all zero."""
    import copy

    import peft

    policy = copy.deepcopy(unet)
    policy.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # fmt: skip
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return policy


def sample_round_pairs(comps, prompts, **sampler_settings):
    """The pairs of one pool-sampler round of the tiny model (colour scorer, threshold 0, fixed seeds)."""
    from spoxl.models.scorers import ColourScorer
    from spoxl.spo.pool_sampler import PoolSampler, PoolSamplerConfig

    cond, uncond = encode_with_negative(comps, prompts)
    sampler = PoolSampler(PoolSamplerConfig(pool_size=2, threshold=0.0, **sampler_settings), comps.scheduler,
                          comps.vae, ColourScorer(scale=1e6))  # fmt: skip
    latents = torch.randn((len(prompts), 4, 8, 8), generator=torch.Generator().manual_seed(0))
    return sampler.sample(comps.unet, prompts, cond, uncond, make_time_ids(len(prompts), (64, 64)), latents,
                          torch.Generator().manual_seed(1)).pairs  # fmt: skip


def reference_of(policy, model=None):
    """A RunView.reference-like context manager factory for a LoRA policy: inside, the adapters are
    disabled and gradients off, and it yields `model` (a wrapper of the policy) or the policy."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        policy.disable_adapters()
        try:
            with torch.no_grad():
                yield policy if model is None else model
        finally:
            policy.enable_adapters()

    return ctx
