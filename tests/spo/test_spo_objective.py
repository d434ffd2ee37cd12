"""The SPO objective's loss: one UNet call for a pair sharing x_t, same loss as separate w/l."""

import pytest
import torch

from spoxl import kernels, sampling
from spoxl.methods.spo import SPOConfig, SPOObjective, pair_means, read_prompts, spo_pair_loss
from spoxl.models.text import encode_prompts, make_time_ids
from spoxl.spo.pairs import PairBatch, deal
from spoxl.errors import SpoxlError
from pool_inputs import lora_policy, reference_of, sample_round_pairs
from spo_threads import one_thread  # noqa: F401  (autouse fixture)

PROMPTS = ["a red circle", "a green square"]
STEPS = 6


class CountingUNet(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.unet(*args, **kwargs)


@pytest.fixture(scope="module")
def lora_unet(tiny_components):
    return lora_policy(tiny_components.unet)


@pytest.fixture(scope="module")
def pairs(tiny_components):
    pairs = sample_round_pairs(tiny_components, PROMPTS, steps=STEPS, divert_start_step=1, num_inner_step=2)
    assert pairs.shared.any() and (~pairs.shared).any()
    return pairs


def kw(comps):
    return dict(scheduler=comps.scheduler, cfg_scale=5.0,
                uncond=encode_prompts(comps, [""]), time_ids=make_time_ids(1, (64, 64)))  # fmt: skip


def test_shared_x_t_runs_the_unet_once(tiny_components, lora_unet, pairs):
    shared = pairs.index(pairs.shared)
    unet = CountingUNet(lora_unet)
    with torch.no_grad():
        w1, l1 = pair_means(unet, shared, share_sources=True, **kw(tiny_components))
        assert unet.calls == 1
        w2, l2 = pair_means(unet, shared, share_sources=False, **kw(tiny_components))
        assert unet.calls == 3  # the straightforward path: one more call
    torch.testing.assert_close(w1, w2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1, l1, rtol=0, atol=0)  # the mean does not depend on x_prev


def test_mixed_batch_matches_separate_forwards_loss_and_grads(tiny_components, lora_unet, pairs):
    counting = CountingUNet(lora_unet)
    results = []
    for share, fused in ((True, True), (False, False)):
        lora_unet.zero_grad()
        counting.calls = 0
        loss, metrics = spo_pair_loss(counting, reference_of(lora_unet, counting), pairs, beta=10.0, clip=0.1, fused=fused,
                                      share_sources=share, **kw(tiny_components))  # fmt: skip
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lora_unet.named_parameters() if p.grad is not None}
        results.append((loss.detach(), metrics, grads, counting.calls))
    (loss_a, m_a, g_a, calls_a), (loss_b, m_b, g_b, calls_b) = results
    assert calls_a == 2 and calls_b == 4  # policy + reference, each once vs twice
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert abs(float(m_a["log_ratio_w"])) > 0  # the policy really differs from the reference
    assert g_a and g_a.keys() == g_b.keys()
    assert any(g.abs().sum() > 0 for g in g_a.values())
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], rtol=1e-4, atol=1e-7)


def test_loss_is_kernels_spo_loss_on_the_recomputed_means(tiny_components, lora_unet, pairs):
    ref_ctx = reference_of(lora_unet)

    with torch.no_grad():
        loss, _ = spo_pair_loss(lora_unet, ref_ctx, pairs, beta=10.0, clip=0.1, **kw(tiny_components))
        mw, ml = pair_means(lora_unet, pairs, **kw(tiny_components))
        with ref_ctx() as ref:
            rw, rl = pair_means(ref, pairs, **kw(tiny_components))
    # plain-torch SPO from methods.md 1.4
    def log_ratio(x, m, r):
        return sampling.transition_logprob(x, m, pairs.std) - sampling.transition_logprob(x, r, pairs.std)

    ratio_w = torch.clamp(log_ratio(pairs.x_w, mw, rw).exp(), 0.9, 1.1)
    ratio_l = torch.clamp(log_ratio(pairs.x_l, ml, rl).exp(), 0.9, 1.1)
    expected = -torch.nn.functional.logsigmoid(10 * (ratio_w.log() - ratio_l.log())).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_deal_gives_equal_shares_and_keeps_the_rest(pairs):
    perm = torch.randperm(len(pairs))
    shares = [deal(pairs, perm, r, 2, 2) for r in range(2)]
    (a, left_a), (b, left_b) = shares
    assert len(a) == len(b) and len(a) % 2 == 0
    assert len(a) + len(b) + len(left_a) == len(pairs)
    torch.testing.assert_close(left_a.x_w, left_b.x_w)  # the leftover is the same on every rank
    seen = torch.cat([a.x_w, b.x_w, left_a.x_w]).flatten(1)
    assert torch.unique(seen, dim=0).shape[0] == len(pairs)


def test_prompt_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a red cat\n\na blue dog\n")
    assert read_prompts(SPOConfig(prompt_file=str(tmp_path / "p.txt"))) == ["a red cat", "a blue dog"]
    (tmp_path / "p.json").write_text('[{"caption": "a red cat", "trainset_idx": 1}, {"caption": "x"}]')
    assert read_prompts(SPOConfig(prompt_file=str(tmp_path / "p.json"))) == ["a red cat", "x"]
    with pytest.raises(SpoxlError, match="does not exist"):
        read_prompts(SPOConfig(prompt_file=str(tmp_path / "missing.txt")))
    with pytest.raises(SpoxlError, match="no prompts"):
        read_prompts(SPOConfig(prompts=[]))


def test_colour_scorer_rejects_colourless_prompts_at_setup(tmp_path):
    # before any sampling (a rank failing mid-round would leave the others waiting in a collective)
    from spoxl.config import load_config
    from spoxl.engine.setup import build_training

    cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", "logging.tensorboard=false",
                                                'method.prompts=["a red circle", "a cat"]'])  # fmt: skip
    objective = SPOObjective.from_recipe(cfg)
    ctx = build_training(cfg, objective)
    with pytest.raises(SpoxlError, match="'a cat' names no colour"):
        objective.setup(ctx.view)


def test_training_means_reproduce_the_sampler_logprobs(tmp_path, monkeypatch):
    """The objective's own training path (its setup's uncond, time_ids, dtype, prediction type, and
    the a_prev/std stored with each pair) must give the means the sampler drew from: log p of x_w
    and x_l under the training-time policy means equals what the sampler stored. The expected
    values come from the sampler, not from pair_means, so a mismatch between the two sides fails."""
    import spoxl.methods.spo as spo_module
    from spoxl.config import load_config
    from spoxl.engine.setup import build_training

    cfg = load_config("configs/tiny_spo.yaml", [
        f"run.output_dir={tmp_path}", "logging.tensorboard=false", "method.steps=6", "method.divert_start_step=1",
        "method.pool_size=2", "method.num_inner_step=2", "method.threshold=0.0", "method.preference.scale=1e6",
        "train.micro_batch_size=2"])  # fmt: skip
    objective = SPOObjective.from_recipe(cfg)
    ctx = build_training(cfg, objective)
    objective.setup(ctx.view)
    with torch.no_grad():  # a LoRA that really changes the policy, so policy != reference
        for name, p in ctx.components.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    batch = objective.sample_round(ctx.view)
    if objective.leftover is not None and len(objective.leftover):
        batch = PairBatch.cat([batch, objective.leftover])
    assert len(batch) > 0 and batch.shared.any() and (~batch.shared).any()  # both kinds of transition

    captured = []
    real = spo_module.pair_means
    monkeypatch.setattr(spo_module, "pair_means", lambda *a, **k: captured.append(real(*a, **k)) or captured[-1])
    with torch.no_grad():
        objective.loss(ctx.view, batch)
    (mean_w, mean_l), (ref_w, ref_l) = captured  # policy first, then the reference
    std = batch.std
    torch.testing.assert_close(kernels.transition_logprob(batch.x_w, mean_w, std), batch.logp_w, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernels.transition_logprob(batch.x_l, mean_l, std), batch.logp_l, rtol=1e-4, atol=1e-4)
    # the check can fail: the reference (adapters off) does not reproduce the policy's samples
    gap = (kernels.transition_logprob(batch.x_w, ref_w, std) - batch.logp_w).abs().max()
    assert gap > 1e-3


def _stream(tmp_path, inner_epochs: int):
    """The tiny SPO recipe's own rollout stream (one rank), `inner_epochs` passes per round."""
    from spoxl.config import load_config
    from spoxl.engine.setup import build_training

    cfg = load_config("configs/tiny_spo.yaml", [
        f"run.output_dir={tmp_path}", "logging.tensorboard=false", "method.steps=4", "method.divert_start_step=1",
        "method.pool_size=2", "method.num_inner_step=0", "method.threshold=0.0", "method.preference.scale=1e6",
        "method.prompts_per_rank=4", "train.micro_batch_size=2", f"method.num_inner_epochs={inner_epochs}"])  # fmt: skip
    objective = SPOObjective.from_recipe(cfg)
    objective.setup(build_training(cfg, objective).view)
    return objective.rollout


def test_inner_epochs_replay_each_rounds_share_in_seeded_new_orders(tmp_path):
    """num_inner_epochs = 3: the round's share as the default serves it, then two reorderings of
    it, drawn from spoxl.rng.PAIR_REPLAY (round 0, passes 1 and 2), before the next round is
    sampled; then the share is freed. A replay that dropped or duplicated pairs, repeated the first
    order, was unseeded or seeded by the wrong round, or was not served at all fails here."""
    from spoxl import rng

    once, thrice = _stream(tmp_path / "once", 1), _stream(tmp_path / "thrice", 3)
    first = PairBatch.cat([next(once)])
    while once.buffer is not None and len(once.buffer):  # the whole first round, as the default serves it
        first = PairBatch.cat([first, next(once)])
    n = len(first)
    assert n >= 4 and once.round == 1
    served = PairBatch.cat([next(thrice) for _ in range(3 * n // 2)])
    assert thrice.round == 1 and thrice.share is None  # one round fed all three passes, then freed it
    torch.testing.assert_close(served.index(slice(0, n)).x_w, first.x_w)
    for p in (1, 2):
        order = torch.randperm(n, generator=rng.generator(rng.PAIR_REPLAY, 0, counter=(0, p)))
        assert not torch.equal(order, torch.arange(n))
        replay = served.index(slice(p * n, (p + 1) * n))
        torch.testing.assert_close(replay.x_w, first.x_w[order])
        torch.testing.assert_close(replay.x_l, first.x_l[order])
    next(thrice)
    assert thrice.round == 2  # only now a new round


def test_a_stream_resumed_mid_replay_serves_what_the_uninterrupted_one_does(tmp_path):
    a = _stream(tmp_path / "a", 3)
    next(a)
    for _ in range(len(a.share) // 2):  # the rest of the share as dealt, and one micro-batch of its first replay
        next(a)
    assert a.share is not None and a.next_pass == 2 and len(a.buffer)
    b = _stream(tmp_path / "b", 3)
    b.load_state_dict(a.state_dict())
    for _ in range(len(a.buffer) // 2 + 2):  # the rest of the first replay and into the second (made after the resume)
        x, y = next(a), next(b)
        torch.testing.assert_close(x.x_w, y.x_w)
        torch.testing.assert_close(x.x_l, y.x_l)
    assert (a.round, a.next_pass) == (b.round, b.next_pass)


def test_inner_epochs_below_one_or_fractional_are_refused(tmp_path):
    from spoxl.config import load_config

    for bad in ("0", "-2"):
        cfg = load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", f"method.num_inner_epochs={bad}"])
        with pytest.raises(SpoxlError, match=f"num_inner_epochs must be >= 1, got {bad}"):
            SPOObjective.from_recipe(cfg).check(cfg)
    with pytest.raises(SpoxlError, match="num_inner_epochs must be an integer"):
        load_config("configs/tiny_spo.yaml", [f"run.output_dir={tmp_path}", "method.num_inner_epochs=1.5"])
