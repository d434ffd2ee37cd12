"""NCP objective (methods.md section 4, mode `t-1`), in-process on one rank with the tiny SDXL.

The expected per-sample perceptual losses are written out here in plain torch: the same generator
stream as the objective (VAE sample, noise, t ~ U{1..999}, then the posterior z), w and l run
separately, the reference taken from a freshly built base UNet, the DDPM posterior step from the
formula in methods.md 4.1, and the encoder features by running the base UNet's own blocks
(time_proj/time_embedding + the SDXL text_time add_embedding, conv_in, down blocks).
"""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from inprocess import make  # noqa: E402

import spoxl.kernels  # noqa: E402
from spoxl.config import load_config  # noqa: E402
from spoxl.data.cache import encode_batch  # noqa: E402
from spoxl.errors import SpoxlError  # noqa: E402
from spoxl.methods.ncp import NCPObjective  # noqa: E402
from spoxl.models.tiny import build_tiny_sdxl  # noqa: E402

NCP = ["method.name=ncp"]


def first_batch(ctx, obj):
    position = obj.state_dict()
    obj.load_state_dict({"epoch": 0, "index": 0})
    batch = next(iter(obj.micro_batches(ctx.view)))
    obj.load_state_dict(position)
    return batch


def fixed_loss(ctx, obj):
    with torch.no_grad():
        loss, metrics = obj.loss(ctx.view, first_batch(ctx, obj))
    return float(loss), {k: float(v) for k, v in metrics.items()}


def perturb_lora(ctx, std=1e-2, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ctx.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def encoder_features(unet, x, t, embeds, pooled, time_ids):
    """The base UNet's encoder, block by block: time + text_time embedding, conv_in, down blocks."""
    emb = unet.time_embedding(unet.time_proj(t).to(x.dtype))
    time_embeds = unet.add_time_proj(time_ids.flatten()).reshape(x.shape[0], -1)
    emb = emb + unet.add_embedding(torch.cat([pooled, time_embeds], dim=-1))
    h = unet.conv_in(x)
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(h, emb, encoder_hidden_states=embeds)
        else:
            h, _ = block(h, emb)
    return h


def by_hand(ctx, batch):
    """Per-sample perceptual MSEs (w, l) of the policy and of the base-UNet reference, and t."""
    gen = torch.Generator().manual_seed(0)  # fixed_noise: seed run.seed * 1000 + rank = 0
    enc = encode_batch(ctx.components, batch, generator=gen)
    x_w, x_l = enc["latents_w"], enc["latents_l"]
    eps = torch.randn(x_w.shape, generator=gen)  # ONE noise per pair
    t = torch.randint(1, 1000, (x_w.shape[0],), generator=gen)  # ONE t >= 1 per pair
    z = torch.randn(x_w.shape, generator=gen)  # ONE posterior z, shared by everything
    ac = ctx.components.scheduler.alphas_cumprod.double()
    col = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    a, a_prev = col(ac[t]), col(ac[t - 1])
    beta_t = 1 - a / a_prev
    var = (1 - a_prev) / (1 - a) * beta_t
    base = build_tiny_sdxl(0).unet.eval()
    cond = dict(encoder_hidden_states=enc["prompt_embeds"],
                added_cond_kwargs={"text_embeds": enc["pooled_prompt_embeds"], "time_ids": enc["time_ids"]})

    def x_prev(x_t, eps_hat):
        x0_hat = (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
        mu = (a_prev.sqrt() * beta_t / (1 - a)) * x0_hat + ((a / a_prev).sqrt() * (1 - a_prev) / (1 - a)) * x_t
        return (mu + var.sqrt() * z).float()

    def feats(x):
        return encoder_features(base, x, t - 1, enc["prompt_embeds"], enc["pooled_prompt_embeds"], enc["time_ids"])

    def mses(x0):
        x_t = (a.sqrt() * x0 + (1 - a).sqrt() * eps).float()
        target = feats(x_prev(x_t.double(), eps.double()))
        pol = ctx.unet(x_t, t, **cond).sample.double()
        ref = base(x_t, t, **cond).sample.double()
        mse = lambda x: ((feats(x_prev(x_t.double(), x)).double() - target.double()) ** 2).flatten(1).mean(1)  # noqa: E731
        return mse(pol), mse(ref)

    with torch.no_grad():
        (mw, rw), (ml, rl) = mses(x_w.double()), mses(x_l.double())
    return (mw, ml), (rw, rl), t


def test_per_sample_losses_and_the_three_kinds_match_plain_torch(tmp_path, monkeypatch):
    ctx, obj = make(tmp_path, [*NCP, "train.max_steps=1"], NCPObjective)
    perturb_lora(ctx, std=0.1)  # policy != reference, by more than the comparison tolerance
    batch = first_batch(ctx, obj)
    (mw, ml), (rw, rl), t = by_hand(ctx, batch)
    seen = {}
    real = spoxl.kernels.ncp_loss

    def spy(feat_w, feat_l, ref_w, ref_l, tgt_w, tgt_l, **kw):
        mse = lambda f, g: ((f.double() - g.double()) ** 2).flatten(1).mean(1)  # noqa: E731
        seen.update(mw=mse(feat_w, tgt_w), ml=mse(feat_l, tgt_l))
        if ref_w is not None:
            seen.update(rw=mse(ref_w, tgt_w), rl=mse(ref_l, tgt_l))
        return real(feat_w, feat_l, ref_w, ref_l, tgt_w, tgt_l, **kw)

    monkeypatch.setattr(spoxl.kernels, "ncp_loss", spy)
    # The tiny UNet's feature MSEs are ~1e-5: a larger beta than 2500 makes the logits O(1e-3..1).
    beta = obj.config.beta = 1e5
    expected = {
        "dpo": -F.logsigmoid(beta * ((rw - rl) - (mw - ml))).mean(),
        "cpo": -F.logsigmoid(-beta * (mw - ml)).mean(),
        "sft": mw.mean(),
    }
    for kind in ("dpo", "cpo", "sft"):
        obj.config.kind = kind
        seen.clear()
        with torch.no_grad():
            loss, metrics = obj.loss(ctx.view, batch)
        for key, value in (("mw", mw), ("ml", ml)) + ((("rw", rw), ("rl", rl)) if kind == "dpo" else ()):
            torch.testing.assert_close(seen[key], value, rtol=2e-4, atol=0)
        if kind != "dpo":
            assert "rw" not in seen  # no reference pass for the reference-free kinds
        assert float(loss) == pytest.approx(float(expected[kind]), rel=1e-3, abs=1e-6)
        assert float(metrics["timestep"]) == pytest.approx(float(t.float().mean()))
    assert ((mw - rw).abs() / rw).min() > 2e-3  # the policy differs from the base by 10x the rtol
    assert abs(float(expected["dpo"]) - math.log(2)) > 1e-4  # a real logit, not the init value


def test_log2_at_init_then_training_lowers_the_loss_through_the_frozen_encoder(tmp_path):
    ctx, obj = make(tmp_path, [*NCP, "train.lr=3e-3", "train.max_steps=4"], NCPObjective)
    start, m0 = fixed_loss(ctx, obj)
    # LoRA B = 0: policy == reference (adapters off) bit for bit, so the logit is exactly 0.
    assert start == pytest.approx(math.log(2), abs=1e-7)
    assert m0["implicit_acc"] == 0.5 and m0["margin"] == 0.0 and m0["d_theta"] == m0["d_ref"] != 0.0
    encoder_before = {n: p.detach().clone() for n, p in obj.encoder.named_parameters()}
    assert encoder_before and not any(p.requires_grad for p in obj.encoder.parameters())
    lora_b = {n: p.detach().clone() for n, p in ctx.unet.named_parameters() if "lora_B" in n}
    assert all(float(v.abs().max()) == 0 for v in lora_b.values())
    ctx.train()
    end, m1 = fixed_loss(ctx, obj)
    assert end < start and m1["margin"] > 0
    # The only path from the loss to the policy runs through the encoder: B (zero at init, so
    # weight decay cannot move it) moved, hence gradients reached the LoRA through the encoder...
    moved = [n for n, p in ctx.unet.named_parameters() if "lora_B" in n and float((p.detach() - lora_b[n]).abs().max()) > 0]
    assert len(moved) > len(lora_b) // 2
    # ... while the frozen encoder received none and did not change.
    for n, p in obj.encoder.named_parameters():
        assert p.grad is None and torch.equal(p, encoder_before[n]), n


@pytest.mark.parametrize("overrides, message", [
    ([*NCP, "method.kind=ipo"], "method.kind must be one of dpo, cpo, sft, got 'ipo'"),
    ([*NCP, "method.beta=0"], "method.beta must be a finite number > 0, got 0"),
    ([*NCP, "method.beta=-5"], "method.beta must be a finite number > 0, got -5"),
    ([*NCP, "method.beta=.nan"], "method.beta must be a finite number, got nan"),
    ([*NCP, "method.snr=0.5"], "unknown key method.snr"),
    ([*NCP, "method.encoder_dtype=bf16"], "method.encoder_dtype must be fp32 or compute, got 'bf16'"),
])
def test_bad_ncp_config_is_a_one_line_error(overrides, message):
    with pytest.raises(SpoxlError, match=message.replace(".", r"\.").replace("(", r"\(")) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_middle_states_under_gradient_checkpointing(tmp_path):
    # The frozen encoder is a separate copy, so the down blocks' recomputation in backward (gradient
    # checkpointing) sees the same frozen weights as the forward did.
    ctx, obj = make(tmp_path, [*NCP, "method.use_middle_states=true", "train.gradient_checkpointing=true",
                               "train.lr=3e-3", "train.max_steps=3"], NCPObjective)
    assert obj.encoder.mid_block is not None
    start, _ = fixed_loss(ctx, obj)
    assert start == pytest.approx(math.log(2), abs=1e-7)
    ctx.train()
    end, m1 = fixed_loss(ctx, obj)
    assert end < start and m1["margin"] > 0


def test_recipes_load_with_the_official_settings():
    root = Path(__file__).resolve().parents[2] / "configs"
    tiny = load_config(root / "tiny_ncp.yaml")
    assert tiny.method.name == "ncp" and tiny.lora.enabled and tiny.model.path == "tiny"
    cfg = load_config(root / "sdxl_ncp_lora.yaml")
    p = cfg.method.params
    assert (cfg.method.name, p.kind, p.beta, p.use_middle_states) == ("ncp", "dpo", 2500.0, False)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.name, cfg.optim.weight_decay) == (64, 64, "adamw8bit", 1e-2)
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.warmup_steps, cfg.train.max_steps) == (8, 64, 500, 2000)
    assert (cfg.data.hflip, cfg.data.ties) == (True, "keep")  # joint pair flips, ties kept: the official run
    assert cfg.train.lr == pytest.approx(1e-8 * 8 * 64) and cfg.run.seed == 69 and cfg.data.resolution == 1024


@pytest.mark.parametrize("encoder_dtype, expected", [("fp32", torch.float32), ("compute", torch.bfloat16)])
def test_frozen_encoder_runs_in_fp32_in_a_bf16_run(tmp_path, monkeypatch, encoder_dtype, expected):
    """NCP's signal in x_{t-1} is about bf16's rounding: the frozen encoder and its inputs stay fp32
    unless method.encoder_dtype says compute; the loss then trains through it as before."""
    ctx, obj = make(tmp_path, [*NCP, "deepspeed.precision=bf16", f"method.encoder_dtype={encoder_dtype}"], NCPObjective)
    assert next(obj.encoder.parameters()).dtype == expected
    seen = []
    real = spoxl.kernels.ncp_loss
    monkeypatch.setattr(spoxl.kernels, "ncp_loss", lambda *a, **k: seen.append(a[0].dtype) or real(*a, **k))
    loss, _ = obj.loss(ctx.view, next(iter(obj.micro_batches(ctx.view))))
    assert torch.isfinite(loss) and seen == [expected]
