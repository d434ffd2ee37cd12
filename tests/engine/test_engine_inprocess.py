"""Single-rank engine behaviour, in-process: clipping, NaN skipping, references, 8-bit AdamW."""

import pytest
import torch

from inprocess import fixed_loss, fixed_unet_input, make, trainable
from spoxl.engine import checkpoint, loop
from spoxl.errors import SpoxlError
from spoxl.methods.sft import SFTObjective
from spoxl.models.tiny import build_tiny_sdxl


def one_step_update(tmp_path, clip, checkpointing=False):
    # AdamW's first step is lr * g / (|g| + eps) per element; with eps >> |g| it is ~ lr * g / eps,
    # linear in the (clipped) gradient, so the update's norm reveals the gradient norm used.
    ctx, obj = make(tmp_path, ["lora.enabled=true", "train.lr=1e4", "optim.eps=1e3", f"train.grad_clip={clip}",
                               "train.max_steps=1", f"train.gradient_checkpointing={str(checkpointing).lower()}"])
    assert ctx.unet.is_gradient_checkpointing == checkpointing
    before = trainable(ctx)
    ctx.train()
    after = trainable(ctx)
    update = torch.sqrt(sum(((after[n] - before[n]).double() ** 2).sum() for n in before))
    return float(update), float(ctx.engine.get_global_grad_norm())


def test_gradient_clipping_clips_only_above_threshold(tmp_path):
    lr_over_eps = 1e4 / 1e3
    unclipped, norm = one_step_update(tmp_path / "a", clip=0.0)
    clip = norm / 10
    clipped, norm2 = one_step_update(tmp_path / "b", clip=clip)
    assert norm == pytest.approx(norm2, rel=1e-5)  # same data, same gradient
    assert unclipped == pytest.approx(lr_over_eps * norm, rel=1e-2)
    assert clipped == pytest.approx(lr_over_eps * clip, rel=1e-2)
    # A threshold above the norm leaves the gradient alone (and gradient checkpointing, on for this
    # run, recomputes activations without changing the gradient).
    loose, norm3 = one_step_update(tmp_path / "c", clip=norm * 10, checkpointing=True)
    assert loose == pytest.approx(unclipped, rel=1e-4)
    assert norm3 == pytest.approx(norm, rel=1e-4)


class NaNAfterFirst(SFTObjective):
    calls = 0

    def loss(self, ctx, batch):
        loss, m = super().loss(ctx, batch)
        NaNAfterFirst.calls += 1
        return (loss * float("nan") if NaNAfterFirst.calls > 1 else loss), m


def test_nonfinite_steps_are_skipped_then_abort_with_last_good_checkpoint(tmp_path):
    ctx, obj = make(tmp_path, ["train.max_steps=10", "train.max_nonfinite_steps=3"], NaNAfterFirst)
    with pytest.raises(loop.NonFiniteAbort, match="3 optimizer steps in a row had a NaN/inf") as e:
        ctx.train()
    assert "\n" not in str(e.value) and "no checkpoint was saved before the abort" in str(e.value)
    good = trainable(ctx)
    assert ctx.global_step == 1 and ctx.engine.skipped_steps == 3
    assert all(torch.isfinite(v).all() for v in good.values())
    ckpt = tmp_path / "checkpoints"
    # The state at the abort is kept under a name that says so, and is never a resume point.
    assert checkpoint.latest_tag(ckpt) is None and (ckpt / "aborted_step_00000001" / checkpoint.COMPLETE).is_file()
    assert "aborted_step_00000001" in str(e.value)
    ctx2, obj2 = make(tmp_path / "fresh", [f"checkpoint.dir={ckpt}"])
    assert checkpoint.load(ctx2, obj2, ckpt) is None


def test_nan_abort_resumes_from_the_periodic_checkpoint_not_the_diverged_weights(tmp_path):
    ctx, obj = make(tmp_path, ["train.max_steps=2", "checkpoint.every=2", "train.max_nonfinite_steps=2",
                               "train.grad_clip=0", "lora.enabled=false"])
    ctx.train()  # two sane steps, checkpointed at step 2
    sane = trainable(ctx)
    # Then the learning rate explodes: the next update makes |w| ~ 1e30 (finite), the steps after overflow.
    # (No periodic save before the abort: the diverged weights are finite for a step or two and
    # would otherwise become a checkpoint; the resume point must be the last save, step 2.)
    ctx.engine.lr_scheduler.base_lrs = [1e30 for _ in ctx.engine.lr_scheduler.base_lrs]
    ctx.config.train.max_steps = 10
    ctx.config.checkpoint.every = 100
    with pytest.raises(loop.NonFiniteAbort) as e:
        ctx.train()
    ckpt = tmp_path / "checkpoints"
    assert checkpoint.latest_tag(ckpt) == "step_00000002"
    assert f"--resume continues from {ckpt / 'step_00000002'}" in str(e.value)
    aborted = f"aborted_step_{ctx.global_step:08d}"
    assert aborted in str(e.value) and (ckpt / aborted).is_dir() and ctx.global_step > 2
    assert max(float(v.abs().max()) for v in trainable(ctx).values()) > 1e20  # the run did diverge
    ctx2, obj2 = make(tmp_path / "fresh", [f"checkpoint.dir={ckpt}", "lora.enabled=false"])
    assert checkpoint.load(ctx2, obj2, ckpt) == "step_00000002"
    resumed = trainable(ctx2)
    assert all(torch.equal(resumed[k], sane[k]) for k in sane)


class WithReference(SFTObjective):
    needs_reference = True


def _out(model, ctx, inputs):
    x, t, e, p, ids = inputs
    with torch.no_grad():
        return ctx.view.unet_output(model, x, t, e, p, ids).float()


def test_lora_reference_is_the_base_unet(tmp_path):
    ctx, obj = make(tmp_path, ["train.max_steps=3", "train.lr=1e-2"])
    ctx.train()
    inputs = fixed_unet_input()
    base = build_tiny_sdxl(0).unet.eval()
    expected = _out(base, ctx, inputs)
    policy = _out(ctx.view.policy, ctx, inputs)
    with ctx.view.reference() as ref:
        reference = _out(ref, ctx, inputs)
    assert torch.allclose(reference, expected, atol=1e-5)
    assert (policy - expected).abs().max() > 1e-3  # training moved the policy
    assert torch.equal(_out(ctx.view.policy, ctx, inputs), policy)  # adapters are back on


def test_full_finetune_reference_stays_frozen_and_8bit_adamw_trains(tmp_path):
    ctx, obj = make(tmp_path, ["lora.enabled=false", "optim.name=adamw8bit", "train.max_steps=3", "train.lr=1e-3"],
                    WithReference)
    inputs = fixed_unet_input()
    start_loss = fixed_loss(ctx, obj)
    ctx.train()
    assert fixed_loss(ctx, obj) < start_loss
    inner = ctx.engine.optimizer.optimizer  # DeepSpeed's ZeRO wrapper around bitsandbytes
    assert type(inner).__name__ == "AdamW8bit"
    assert any(isinstance(v, torch.Tensor) and v.dtype == torch.uint8
               for state in inner.state.values() for v in state.values())
    expected = _out(build_tiny_sdxl(0).unet.eval(), ctx, inputs)
    with ctx.view.reference() as ref:
        assert not any(p.requires_grad for p in ref.parameters())
        assert torch.equal(_out(ref, ctx, inputs), expected)
    assert (_out(ctx.view.policy, ctx, inputs) - expected).abs().max() > 1e-4


def test_latest_ignores_a_partial_save(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "step_00000002").mkdir(parents=True)
    (ckpt / "step_00000002" / checkpoint.COMPLETE).write_text("2")
    (ckpt / checkpoint.LATEST).write_text("step_00000002")
    (ckpt / "step_00000004").mkdir()  # killed mid-save: no completion marker
    assert checkpoint.latest_tag(ckpt) == "step_00000002"
    (ckpt / checkpoint.LATEST).write_text("step_00000004")  # even a pointer to it is not trusted
    assert checkpoint.latest_tag(ckpt) == "step_00000002"


def test_bf16_with_gradient_accumulation(tmp_path):
    ctx, obj = make(tmp_path, ["deepspeed.precision=bf16", "train.max_steps=3", "train.lr=1e-2", "train.grad_accum=2",
                               "data.synthetic_size=6"])
    assert ctx.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in ctx.unet.parameters())
    assert next(ctx.components.text_encoder.parameters()).dtype == torch.bfloat16  # frozen encoders: compute dtype
    assert next(ctx.components.vae.parameters()).dtype == torch.float32  # the VAE stays fp32 (model.vae_dtype)
    start = fixed_loss(ctx, obj)
    ctx.train()
    assert fixed_loss(ctx, obj) < start
    # 3 optimizer steps of 2 micro-batches each: 6 micro-batches = 2 epochs of 3 batches.
    assert ctx.engine.global_steps == 3 and ctx.engine.micro_steps == 6
    assert obj.state_dict() == {"epoch": 1, "index": 3}


def test_lr_warmup_and_schedules():
    from spoxl.config import load_config
    from spoxl.engine.setup import lr_lambda

    f = lr_lambda(load_config(None, ["train.warmup_steps=4", "train.max_steps=14", "train.lr_schedule=cosine"]))
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    f = lr_lambda(load_config(None, ["train.max_steps=10", "train.lr_schedule=linear"]))
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5)
    assert lr_lambda(load_config(None, []))(50) == 1.0


def test_zero3_offload_config_trains(tmp_path):
    # Optimizer and parameters offloaded to CPU, stepped by the client torch AdamW.
    ctx, obj = make(tmp_path, ["deepspeed.config=zero3_offload", "train.max_steps=2", "train.lr=1e-2"])
    start = fixed_loss(ctx, obj)
    ctx.train()
    assert fixed_loss(ctx, obj) < start


@pytest.mark.parametrize("prediction_type, gamma", [("v_prediction", 5.0), ("epsilon", None)])
def test_sft_loss_matches_plain_torch(tmp_path, prediction_type, gamma):
    from spoxl.data.cache import encode_batch

    ctx, obj = make(tmp_path, [f"model.prediction_type={prediction_type}",
                               f"method.snr_gamma={'null' if gamma is None else gamma}", "train.max_steps=1"])
    batch = next(iter(obj.micro_batches(ctx.view)))
    with torch.no_grad():
        loss, _ = obj.loss(ctx.view, batch)
        # Independently: same seeded stream (VAE sample, then noise, then timesteps), math by hand.
        gen = torch.Generator().manual_seed(0)
        enc = encode_batch(ctx.components, batch, generator=gen)
        x0 = enc["latents"]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen)
        a = ctx.components.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = ctx.unet(x_t, t, encoder_hidden_states=enc["prompt_embeds"],
                       added_cond_kwargs={"text_embeds": enc["pooled_prompt_embeds"], "time_ids": enc["time_ids"]}).sample
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else noise
        mse = ((out - target) ** 2).mean(dim=(1, 2, 3))
        snr = (a / (1 - a)).view(-1)
        weight = torch.clamp(snr, max=gamma) / (snr + 1) if gamma else torch.ones_like(snr)
        expected = (weight * mse).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_sft_with_latent_cache_trains_and_fills_the_cache(tmp_path):
    ctx, obj = make(tmp_path, [f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=2", "train.lr=1e-2"])
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 2
    start = fixed_loss(ctx, obj)
    ctx.train()
    assert fixed_loss(ctx, obj) < start


def test_max_minutes_stops_the_loop_and_the_cost_is_counted(tmp_path, monkeypatch):
    # A fake clock that advances 25 s per reading (one at the start, one before each step): a
    # 1-minute budget admits steps at 25 s and 50 s, then stops at 75 s.
    clock = iter(range(0, 10_000, 25))
    monkeypatch.setattr(loop, "_clock", lambda: float(next(clock)))
    ctx, obj = make(tmp_path, ["train.max_steps=50", "train.max_minutes=1"])
    last = ctx.train()
    assert ctx.global_step == 2 and last["train/steps"] == 2
    # SFT: one UNet call per micro-batch of 2 latents, nothing else (no reference, no sampling).
    assert last["train/unet_samples"] == 2 * ctx.global_step
    assert last["memory/peak_rss_mib"] > 100


@pytest.mark.parametrize("lora", [True, False])
def test_unet_samples_count_the_reference_whether_adapters_off_or_a_frozen_copy(tmp_path, lora):
    from spoxl.methods.diffusion_dpo import DiffusionDPOObjective

    ctx, obj = make(tmp_path, [f"lora.enabled={str(lora).lower()}", "train.max_steps=2", "method.name=dpo"],
                    DiffusionDPOObjective)
    last = ctx.train()
    assert last["train/unet_samples"] == 2 * 2 * 4  # 2 steps x (policy + reference) x [2 winners; 2 losers]


def test_max_minutes_must_be_positive(tmp_path):
    with pytest.raises(SpoxlError, match="train.max_minutes must be a number > 0"):
        make(tmp_path, ["train.max_minutes=0"])


@pytest.mark.skipif(not __import__("spoxl.engine.ds_config", fromlist=["x"]).fp16_supported_on_cpu(),
                    reason="this CPU has no mkldnn fp16 (spoxl refuses fp16 there: test_fp16_is_refused_on_a_cpu_without_it)")
def test_fp16_runs_keep_fp32_master_weights_for_the_lora(tmp_path):
    """`deepspeed.precision: fp16` is the official runs' "fp16 mixed precision with fp32 LoRA
    weights": the LoRA parameters the forward uses are fp16 (as autocast would cast them for every
    matmul), the optimizer updates fp32 master copies, and training moves the weights."""
    ctx, obj = make(tmp_path, ["deepspeed.precision=fp16", "train.max_steps=2", "train.lr=1e-2"])
    trainable = [p for p in ctx.unet.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float16 for p in trainable)
    masters = ctx.engine.optimizer.single_partition_of_fp32_groups  # ZeRO-1/2's flat fp32 partitions
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert sum(m.numel() for m in masters) >= sum(p.numel() for p in trainable) // ctx.world_size
    before = [m.clone() for m in masters]
    ctx.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, masters))


def test_fp16_is_refused_on_a_cpu_without_it(monkeypatch):
    """Where mkldnn has no fp16 kernels, an fp16 recipe on CPU is a one-line error, not a crash mid-step."""
    from spoxl.config import load_config
    from spoxl.engine import ds_config
    from spoxl.errors import SpoxlError

    monkeypatch.setattr(ds_config, "fp16_supported_on_cpu", lambda: False)
    with pytest.raises(SpoxlError, match="fp16 is not supported by this CPU"):
        ds_config.build_ds_config(load_config(None, ["deepspeed.precision=fp16"]), 1, on_cpu=True)
