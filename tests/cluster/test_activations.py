"""One micro-step's activation memory (spoxl.cluster.activations), measured on the meta device."""

import pytest
import torch

from spoxl.cluster.activations import StoragePeak, activation_peak_bytes
from spoxl.config import LoraConfig, load_config
from spoxl.models.tiny import tiny_unet_config
from spoxl.registry import objective_class

LORA = LoraConfig(enabled=True, rank=4)


def test_storage_peak_counts_new_storages_until_freed_and_never_views_or_preexisting():
    x = torch.zeros(1000)  # 4,000 B, created before: never counted
    with StoragePeak(ignore=[x]) as m:
        x.view(10, 100).t()  # views of a pre-existing storage: nothing new
        a = x + 1  # 4,000
        b = a * 2  # 8,000 live
        b.view(-1)  # a view of b: nothing new
        del a  # 4,000 live
        c = b + 1  # 8,000 live
        d = torch.ones(3000, dtype=torch.float16)  # 6,000 -> 14,000 live: the peak
        del b, c, d
    assert m.peak == 14_000
    assert m.live == 0


@pytest.mark.parametrize("checkpointing", [True, False])
def test_meta_measurement_matches_real_cpu_tensors(checkpointing):
    """The meta device runs no kernel: what it holds for attention is the flash-like stand-in.
    The real CPU run (flash_attention_for_cpu) must hold the same within a few percent; the math
    path meta would otherwise take (L x L fp32 weights, saved) is what this would catch."""
    cfg = dict(tiny_unet_config())
    kw = dict(rows=2, resolution=64, gradient_checkpointing=checkpointing, dtype=torch.bfloat16)
    meta = activation_peak_bytes(cfg, LORA, **kw)
    real = activation_peak_bytes(cfg, LORA, device="cpu", **kw)
    assert real > 100_000
    assert meta == pytest.approx(real, rel=0.08)


def test_activation_memory_follows_rows_resolution_and_checkpointing():
    cfg = dict(tiny_unet_config())

    def peak(**kw):
        base = dict(rows=2, resolution=64, gradient_checkpointing=False, dtype=torch.bfloat16)
        return activation_peak_bytes(cfg, LORA, **{**base, **kw})

    two = peak()
    assert peak(rows=4) == pytest.approx(2 * two, rel=0.1)  # linear in rows
    assert peak(resolution=128) > 3 * two  # 4x the latent pixels
    assert peak(gradient_checkpointing=True) < 0.5 * two
    assert peak(dtype=torch.float32) == pytest.approx(2 * two, rel=0.1)


def test_bad_resolution_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        activation_peak_bytes(dict(tiny_unet_config()), LORA, rows=1, resolution=60)


@pytest.mark.parametrize("method, sets, rows, resolution", [
    # SPO's inner steps give pairs whose winner and loser left different x_t: 2 sources, x2 for CFG
    ("spo", [], 4, None),
    ("spo", ["method.num_inner_step=0"], 2, None),  # per-step branching: every pair shares its x_t
    ("spo", ["method.num_inner_step=0", "method.train_cfg=false"], 1, None),
    ("spo", ["method.num_inner_step=0", "method.share_sources=false", "method.resolution=512"], 4, 512),
    ("spo", ["method.cfg_scale=1.0"], 2, None),
    ("diffusion_dpo", ["data.resolution=256"], 2, 256),  # winner + loser
    ("mapo", [], 2, 64),
    ("ncp", [], 2, 64),
    ("sft", [], 1, 64),
])
def test_each_method_states_its_micro_step_unet_batch(method, sets, rows, resolution):
    cfg = load_config(None, [f"method.name={method}", *sets])
    assert objective_class(method).micro_step_unet_batch(cfg) == (rows, resolution)


def test_spo_states_its_sampling_batch_and_offline_methods_none():
    cfg = load_config(None, ["method.name=spo", "method.prompts_per_rank=3", "method.pool_size=4"])
    assert objective_class("spo").sampling_batch(cfg) == (24, 12)  # CFG halves of 12 candidates; 12 decodes
    cfg = load_config(None, ["method.name=spo", "method.cfg_scale=1.0"])
    assert objective_class("spo").sampling_batch(cfg) == (4, 4)
    assert objective_class("diffusion_dpo").sampling_batch(load_config(None, ["method.name=diffusion_dpo"])) is None


def test_preflight_counts_the_decode_one_chunk_at_a_time():
    # the pool's images go through the VAE 16 at a time (sampling.DECODE_CHUNK): a pool of 12 in
    # one call, a pool of 24 (6 prompts x 4, or 3 prompts x 4 branched twice) in calls of 16
    from spoxl.cluster.activations import micro_step_activations

    sets = ["method.name=spo", "method.pool_size=4", "method.num_inner_step=0", "method.resolution=64"]
    for more, sampling in ((["method.prompts_per_rank=3"], (24, 12)), (["method.prompts_per_rank=6"], (48, 16)),
                           (["method.prompts_per_rank=3", "method.branch_repeats=2"], (48, 16))):  # fmt: skip
        cfg = load_config(None, [*sets, *more])
        assert micro_step_activations(cfg, dict(tiny_unet_config())).sampling == sampling


def test_preflight_counts_four_sdxl_size_images_per_decode():
    # at 1024 px a VAE call holds 4 images (sampling.DECODE_PIXELS): a pool of 12 in calls of 4
    from spoxl.cluster.activations import micro_step_activations

    cfg = load_config(None, ["method.name=spo", "method.pool_size=4", "method.num_inner_step=0",
                             "method.resolution=1024", "method.prompts_per_rank=3"])  # fmt: skip
    assert micro_step_activations(cfg, dict(tiny_unet_config())).sampling == (24, 4)


def test_storage_peak_counts_growth_of_a_counted_storage():
    with StoragePeak() as m:
        a = torch.empty(0)
        a.resize_(1000)  # 4,000 B
        b = torch.empty(0)
        torch.cat([a, a], out=b)  # 8,000 B more, through out=
    assert m.peak == 12_000


def test_sampling_peak_is_the_larger_of_the_unet_forward_and_the_vae_decode():
    from spoxl.cluster.activations import sampling_peak_bytes
    from spoxl.models.tiny import build_tiny_sdxl

    vae_config = dict(build_tiny_sdxl(0).vae.config)
    kw = dict(resolution=64, dtype=torch.float32, vae_config=vae_config)
    one = sampling_peak_bytes(dict(tiny_unet_config()), LORA, unet_rows=1, images=1, vae_dtype=torch.float32, **kw)
    many_images = sampling_peak_bytes(dict(tiny_unet_config()), LORA, unet_rows=1, images=8,
                                      vae_dtype=torch.float32, **kw)  # fmt: skip
    half_vae = sampling_peak_bytes(dict(tiny_unet_config()), LORA, unet_rows=1, images=8,
                                   vae_dtype=torch.bfloat16, **kw)  # fmt: skip
    assert many_images > 4 * one  # the decode dominates and grows with the images
    assert half_vae == pytest.approx(many_images / 2, rel=0.15)
