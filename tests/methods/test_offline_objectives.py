"""Diffusion-DPO and MaPO objectives, in-process on one rank with the tiny SDXL.

The expected losses are written out from methods.md (sections 2.1 and 3.1) in plain torch, on the
same generator stream as the objective (VAE sample, then noise, then timesteps), with w and l run
through the UNet separately and the DPO reference taken from a freshly built base UNet -- so the
stacking, the shared noise/timestep and the adapters-disabled reference are all checked, not
re-derived from the code under test.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))
from inprocess import fixed_unet_input, make  # noqa: E402  (single-rank engine builder shared with tests/engine)

from spoxl.config import load_config  # noqa: E402
from spoxl.data.cache import encode_batch  # noqa: E402
from spoxl.errors import SpoxlError  # noqa: E402
from spoxl.methods.diffusion_dpo import DiffusionDPOObjective  # noqa: E402
from spoxl.methods.mapo import MaPOObjective  # noqa: E402
from spoxl.models.tiny import build_tiny_sdxl  # noqa: E402

DPO = ["method.name=dpo"]
MAPO = ["method.name=mapo"]


def first_batch(ctx, obj):
    """The dataset's first micro-batch, leaving the data position where it was."""
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
    """Give the LoRA B matrices (zero at init) small random values: policy != reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ctx.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def by_hand(ctx, batch, prediction_type="epsilon"):
    """Per-sample policy MSEs (w, l), the same for the base UNet, and t: methods.md's recipe."""
    gen = torch.Generator().manual_seed(0)  # fixed_noise: seed run.seed * 1000 + rank = 0
    enc = encode_batch(ctx.components, batch, generator=gen)
    x_w, x_l = enc["latents_w"], enc["latents_l"]
    noise = torch.randn(x_w.shape, generator=gen)  # ONE noise for both images of a pair
    t = torch.randint(0, 1000, (x_w.shape[0],), generator=gen)  # ONE timestep per pair
    a = ctx.components.scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    base = build_tiny_sdxl(0).unet.eval()

    def mse(unet, x0):
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        out = unet(x_t, t, encoder_hidden_states=enc["prompt_embeds"],
                   added_cond_kwargs={"text_embeds": enc["pooled_prompt_embeds"], "time_ids": enc["time_ids"]}).sample
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if prediction_type == "v_prediction" else noise
        return ((out.float() - target) ** 2).mean(dim=(1, 2, 3))

    with torch.no_grad():
        return (mse(ctx.unet, x_w), mse(ctx.unet, x_l)), (mse(base, x_w), mse(base, x_l)), t


@pytest.mark.parametrize("prediction_type, beta", [("epsilon", 5000.0), ("v_prediction", 300.0)])
def test_dpo_loss_is_the_paper_formula_with_an_adapters_disabled_reference(tmp_path, prediction_type, beta):
    ctx, obj = make(tmp_path, [*DPO, f"method.beta={beta}", f"model.prediction_type={prediction_type}",
                               "train.max_steps=1"], DiffusionDPOObjective)
    perturb_lora(ctx)
    probe = fixed_unet_input()
    with torch.no_grad():
        before = ctx.view.unet_output(ctx.view.policy, *probe)
    batch = first_batch(ctx, obj)
    with torch.no_grad():
        loss, metrics = obj.loss(ctx.view, batch)
    (mw, ml), (rw, rl), t = by_hand(ctx, batch, prediction_type)
    logit = -beta / 2 * ((mw - ml) - (rw - rl))
    expected = -F.logsigmoid(logit.double()).mean()
    # The reference really is the base UNet (adapters off), and differs from the perturbed policy.
    assert float(metrics["ref_mse_w"]) == pytest.approx(float(rw.mean()), rel=1e-5)
    assert float(metrics["ref_mse_l"]) == pytest.approx(float(rl.mean()), rel=1e-5)
    assert float(metrics["mse_w"]) == pytest.approx(float(mw.mean()), rel=1e-5)
    assert abs(float(metrics["mse_w"]) - float(metrics["ref_mse_w"])) > 1e-6
    assert float(metrics["timestep"]) == pytest.approx(float(t.float().mean()))
    assert float(loss) == pytest.approx(float(expected), rel=1e-3, abs=1e-5)
    assert abs(float(loss) - math.log(2)) > 1e-3  # a real logit, not the init value
    assert float(metrics["implicit_acc"]) == float(((logit > 0).float() + 0.5 * (logit == 0).float()).mean())
    # ctx.view.reference() turned the adapters back on: the policy output is the perturbed one again.
    with torch.no_grad():
        assert torch.equal(ctx.view.unet_output(ctx.view.policy, *probe), before)
        assert (before - build_tiny_sdxl(0).unet.eval()(*probe[:2], encoder_hidden_states=probe[2], added_cond_kwargs={
            "text_embeds": probe[3], "time_ids": probe[4]}).sample).abs().max() > 1e-4


@pytest.mark.parametrize("lora", ["true", "false"])
def test_dpo_loss_is_log2_when_policy_equals_reference(tmp_path, lora):
    # LoRA: B = 0 at init, so adapters on == adapters off. Full fine-tuning: the frozen copy.
    ctx, obj = make(tmp_path, [*DPO, f"lora.enabled={lora}", "train.max_steps=1"], DiffusionDPOObjective)
    loss, metrics = fixed_loss(ctx, obj)
    if lora == "true":  # the very same module and weights: bit-identical MSEs, logit exactly 0
        assert loss == pytest.approx(math.log(2), abs=1e-7)
        assert metrics["implicit_acc"] == 0.5  # ties count one half
        assert metrics["mse_w"] == metrics["ref_mse_w"] and metrics["mse_l"] == metrics["ref_mse_l"]
    else:  # a separate copy: equal up to fp32 rounding, which beta / 2 = 2500 magnifies in the logit
        assert loss == pytest.approx(math.log(2), abs=1e-3)
        assert metrics["mse_w"] == pytest.approx(metrics["ref_mse_w"], rel=1e-6)
        assert metrics["mse_l"] == pytest.approx(metrics["ref_mse_l"], rel=1e-6)
    assert metrics["mse_w"] != metrics["mse_l"]  # different images: a real pair


def test_mapo_loss_is_the_official_formula(tmp_path):
    ctx, obj = make(tmp_path, [*MAPO, "method.beta=0.3", "method.snr=0.7", "train.max_steps=1"], MaPOObjective)
    perturb_lora(ctx)
    batch = first_batch(ctx, obj)
    with torch.no_grad():
        loss, metrics = obj.loss(ctx.view, batch)
    (mw, ml), _, _ = by_hand(ctx, batch)
    mw, ml = mw.double(), ml.double()
    g = lambda m: 0.7 * m / (torch.exp(0.7 * m) - 1)  # noqa: E731
    expected = mw.mean() - 0.3 * F.logsigmoid(1000 * (g(mw) - g(ml))).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)
    assert float(metrics["mse_w"]) == pytest.approx(float(mw.mean()), rel=1e-5)
    assert float(metrics["margin"]) == pytest.approx(float((g(mw) - g(ml)).mean()), rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("cls, overrides", [(DiffusionDPOObjective, [*DPO, "train.lr=3e-3"]),
                                            (MaPOObjective, [*MAPO, "train.lr=1e-2"])])
def test_a_few_steps_on_a_fixed_pair_batch_learn_the_preference(tmp_path, cls, overrides):
    # synthetic_size 2 = one micro-batch per epoch, fixed_noise: every step sees the same inputs.
    ctx, obj = make(tmp_path, [*overrides, "train.max_steps=4"], cls)
    start, m0 = fixed_loss(ctx, obj)
    ctx.train()
    end, m1 = fixed_loss(ctx, obj)
    assert end < start
    if cls is DiffusionDPOObjective:
        assert m0["implicit_acc"] == 0.5 and m1["implicit_acc"] == 1.0
        assert m1["margin"] > 0
    else:
        assert m1["margin"] > m0["margin"]  # g(L_w) - g(L_l) grew: the winner is denoised better


def test_state_dict_restores_the_next_pair_batch(tmp_path):
    ctx, obj = make(tmp_path, [*DPO, "data.synthetic_size=8", "data.shuffle=true", "train.max_steps=1"],
                    DiffusionDPOObjective)
    stream = obj.micro_batches(ctx.view)
    for _ in range(5):  # 4 batches per epoch: this crosses into epoch 1
        next(stream)
    state = obj.state_dict()
    assert state == {"epoch": 1, "index": 1}
    expected = next(stream)
    fresh = DiffusionDPOObjective.from_recipe(ctx.config)
    fresh.setup(ctx.view)
    fresh.load_state_dict(state)
    got = next(fresh.micro_batches(ctx.view))
    assert got["caption"] == expected["caption"]
    assert torch.equal(got["pixels_w"], expected["pixels_w"]) and torch.equal(got["pixels_l"], expected["pixels_l"])
    assert not torch.equal(got["pixels_w"], got["pixels_l"])


def test_pair_table_with_latent_cache(tmp_path):
    from spoxl.data.synthetic import write_pair_table

    table = write_pair_table(tmp_path / "pairs.jsonl", 3, size=(80, 64), ties=1)  # 1 tie dropped: 2 pairs
    cache = tmp_path / "cache"
    ctx, obj = make(tmp_path / "run", [*MAPO, f"data.path={table}", f"data.cache_dir={cache}", "train.max_steps=1"],
                    MaPOObjective)
    assert len(list(cache.rglob("*.safetensors"))) == 2
    batch = first_batch(ctx, obj)
    assert batch["latents_w"].shape == batch["latents_l"].shape == (2, 4, 8, 8)
    loss, metrics = fixed_loss(ctx, obj)
    assert math.isfinite(loss) and metrics["mse_w"] > 0


@pytest.mark.parametrize("overrides, message", [
    ([*DPO, "method.beta=0"], "method.beta must be a finite number > 0, got 0"),
    ([*DPO, "method.beta=.nan"], "method.beta must be a finite number, got nan"),
    ([*DPO, "method.snr=0.5"], "unknown key method.snr"),
    ([*MAPO, "method.snr=-1"], "method.snr must be a finite number > 0, got -1"),
    ([*MAPO, "method.beta=-0.1"], "method.beta must be a finite number >= 0, got -0.1"),
    ([*MAPO, "method.beta=big"], "method.beta"),
])
def test_bad_method_values_are_one_line_errors(overrides, message):
    with pytest.raises(SpoxlError, match=message.replace(".", r"\.")) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_missing_pair_file_fails_in_check(tmp_path):
    cfg = load_config(None, [*DPO, f"data.path={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(SpoxlError) as e:
        DiffusionDPOObjective.from_recipe(cfg).check(cfg)
    assert "nope.jsonl" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("recipe, name, params", [
    ("tiny_dpo", "dpo", {"beta": 5000.0}),
    ("tiny_mapo", "mapo", {"beta": 0.1, "snr": 0.5}),
    ("sdxl_dpo_lora", "dpo", {"beta": 5000.0}),
    ("sdxl_mapo", "mapo", {"beta": 0.1, "snr": 0.5}),
])
def test_recipes_load_with_the_official_hyper_parameters(recipe, name, params):
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{recipe}.yaml")
    assert cfg.method.name == name
    assert {k: getattr(cfg.method.params, k) for k in params} == params
    if recipe.startswith("sdxl"):  # methods.md 2.3 (diffusers LoRA example) and 3.2 (MaPO README)
        assert (cfg.train.lr, cfg.train.lr_schedule, cfg.optim.name) == (1e-5, "constant", "adamw8bit")
        assert (cfg.train.micro_batch_size, cfg.train.grad_accum) == (8, 2)
        assert cfg.lora.enabled == (name == "dpo") and (not cfg.lora.enabled or cfg.lora.rank == 8)


def test_synthetic_pairs_always_differ_in_colour_only():
    from spoxl.data.synthetic import SyntheticPairDataset

    data = SyntheticPairDataset(72, 16, seed=3)
    losers = set()
    for i in range(len(data)):
        item = data[i]
        w, lo = item["pixels_w"], item["pixels_l"]
        square_w, square_l = (w > 0).any(0), (lo > 0).any(0)  # every colour has a channel at +1; black is -1
        assert torch.equal(square_w, square_l) and square_w.any(), i  # the same square...
        assert not torch.equal(w, lo), i  # ...in another colour
        losers.add((item["caption"], tuple(lo[:, square_l][:, 0].tolist())))
    assert len(losers) == 30  # 6 colours x 5 wrong colours: every (caption, loser colour) occurs
    assert len({data.cache_key(i) for i in range(12)}) == 12


def test_dpo_under_zero3_full_finetune_trains_against_a_partitioned_reference(tmp_path):
    # ZeRO-3 full fine-tuning: the reference is a frozen DeepSpeed engine with partitioned weights.
    ctx, obj = make(tmp_path, [*DPO, "deepspeed.config=zero3", "lora.enabled=false", "train.lr=1e-3",
                               "train.max_steps=3"], DiffusionDPOObjective)
    assert ctx.reference_engine is not None
    start, m0 = fixed_loss(ctx, obj)
    assert start == pytest.approx(math.log(2), abs=1e-3)
    ctx.train()
    end, m1 = fixed_loss(ctx, obj)
    assert end < start and m1["margin"] > 0
    assert m1["ref_mse_w"] == pytest.approx(m0["ref_mse_w"], rel=1e-6)  # the reference did not move
