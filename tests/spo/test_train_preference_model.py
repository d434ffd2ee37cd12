"""Training the step-aware preference model: the PickScore pair loss learns; predicted-x0 inputs
share noise between w and l. (The tiny random VAE destroys image content, so the learning test
feeds clean pixels; the predicted-x0 path is tested for its own contract.)"""

import math

import pytest

import torch

from spoxl.data.pairs import PreferencePairDataset
from spoxl.data.synthetic import write_pair_table
from spoxl.models.preference import StepAwareCLIP
from spoxl.commands.train_preference_model import predicted_x0_images, spm_loss, train_spm
from spo_threads import one_thread  # noqa: F401  (autouse fixture)


def test_spm_learns_pairs_and_ties_cost_nothing(tmp_path, tiny_components):
    dataset = PreferencePairDataset(write_pair_table(tmp_path / "pairs.jsonl", 12, ties=2), 32, drop_ties=False)
    model = StepAwareCLIP.tiny(seed=0, image_size=32)
    clean = lambda comps, pw, pl, prompts, t, **kw: (pw, pl)  # noqa: E731
    history = train_spm(model, tiny_components, dataset, steps=40, batch_size=4, lr=2e-3, weight_decay=0.0,
                        to_images=clean)  # fmt: skip
    first = sum(h["loss"] for h in history[:8]) / 8
    last = sum(h["loss"] for h in history[-8:]) / 8
    assert last < 0.6 * first, (first, last)
    items = [dataset[i] for i in range(len(dataset)) if not dataset[i]["tie"]]
    pw, pl = torch.stack([it["pixels_w"] for it in items]), torch.stack([it["pixels_l"] for it in items])
    prompts = [it["caption"] for it in items]
    with torch.no_grad():
        _, acc = spm_loss(model, pw, pl, prompts, 500, torch.zeros(len(items)))
    assert acc >= 0.9
    # a tie between identical images costs exactly 0 (the log 0.5 offset)
    with torch.no_grad():
        loss, _ = spm_loss(model, pw[:2], pw[:2], prompts[:2], 0, torch.ones(2))
    assert abs(float(loss)) < 1e-5
    # a decided pair with equal scores costs log 2
    with torch.no_grad():
        loss, _ = spm_loss(model, pw[:2], pw[:2], prompts[:2], 0, torch.zeros(2))
    assert abs(float(loss) - math.log(2)) < 1e-5


def test_predicted_x0_images_share_noise(tiny_components):
    g = torch.Generator().manual_seed(0)
    px = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    other = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    t = torch.tensor([900, 900])
    a_w, a_l = predicted_x0_images(tiny_components, px, px, ["a red cat", "a blue dog"], t,
                                   generator=torch.Generator().manual_seed(1))  # fmt: skip
    torch.testing.assert_close(a_w, a_l)  # same image + same noise -> same input to the SPM
    b_w, b_l = predicted_x0_images(tiny_components, px, other, ["a red cat", "a blue dog"], t,
                                   generator=torch.Generator().manual_seed(1))  # fmt: skip
    torch.testing.assert_close(b_w, a_w)  # w's input does not depend on l
    assert a_w.shape == (2, 3, 64, 64) and a_w.min() >= -1 and a_w.max() <= 1


def test_per_prompt_weighting_is_the_official_normalised_inverse_count():
    """weight 1/(pairs with the caption), normalised over the batch: a prompt with 3 pairs in the
    dataset counts a third of one with a single pair."""
    from spoxl.commands.train_preference_model import spm_loss as loss_fn

    class Fixed:  # scores chosen per call: w then l
        def __init__(self, s_w, s_l):
            self.calls = [torch.tensor(s_w), torch.tensor(s_l)]

        def score(self, images, prompts, t):
            return self.calls.pop(0)

    s_w, s_l = [2.0, 0.0, 1.0], [0.0, 1.0, 1.0]
    per_pair = [-torch.log_softmax(torch.tensor([a, b]), 0)[0] for a, b in zip(s_w, s_l)]
    counts = torch.tensor([3, 3, 1])
    w = 1 / counts.double()
    expected = sum(float(p) * float(x) for p, x in zip(per_pair, w / w.sum()))
    loss, _ = loss_fn(Fixed(s_w, s_l), None, None, ["a", "a", "b"], 0, torch.zeros(3), counts)
    assert abs(float(loss) - expected) < 1e-6
    plain, _ = loss_fn(Fixed(s_w, s_l), None, None, ["a", "a", "b"], 0, torch.zeros(3))
    assert abs(float(plain) - sum(float(p) for p in per_pair) / 3) < 1e-6 and abs(float(plain) - expected) > 1e-3


def test_schedule_warms_up_then_decays_linearly_to_zero(tmp_path, tiny_components):
    from spoxl.commands.train_preference_model import lr_factor

    assert [lr_factor(s, 4, 12) for s in (0, 1, 3, 4, 8, 12)] == [0.25, 0.5, 1.0, 1.0, 0.5, 0.0]
    dataset = PreferencePairDataset(write_pair_table(tmp_path / "pairs.jsonl", 8), 32, drop_ties=False)
    model = StepAwareCLIP.tiny(seed=0, image_size=32)
    clean = lambda comps, pw, pl, prompts, t, **kw: (pw, pl)  # noqa: E731
    history = train_spm(model, tiny_components, dataset, steps=8, batch_size=4, lr=1e-3, to_images=clean,
                        warmup_steps=2, decay=True)  # fmt: skip
    lrs = [h["lr"] for h in history]
    assert lrs[:3] == pytest.approx([5e-4, 1e-3, 1e-3]) and lrs[-1] == pytest.approx(1e-3 / 6)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_latents_are_posterior_samples_and_t0_evaluation_scores_clean_images(tiny_components, tmp_path, monkeypatch):
    import spoxl.commands.train_preference_model as spm

    px = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    t = torch.tensor([10, 10])
    a, _ = predicted_x0_images(tiny_components, px, px, ["x", "y"], t, generator=torch.Generator().manual_seed(1))
    b, _ = predicted_x0_images(tiny_components, px, px, ["x", "y"], t, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, b)  # another posterior (and noise) sample, not the deterministic mean
    dataset = PreferencePairDataset(write_pair_table(tmp_path / "pairs.jsonl", 4), 32, drop_ties=False)
    assert dataset.captions() == [dataset[i]["caption"] for i in range(len(dataset))]
    seen = []
    monkeypatch.setattr(spm, "predicted_x0_images", lambda c, pw, pl, prompts, t, **k: seen.append(int(t[0])) or (pw, pl))
    spm.evaluate(StepAwareCLIP.tiny(seed=0, image_size=32), tiny_components, dataset, timesteps=(0, 501))
    assert seen == [501]  # t = 0 scored the clean images, no UNet prediction


def test_relabelling_by_a_reward_model_swaps_and_ties(tmp_path):
    from spoxl.commands.train_preference_model import RelabelledPairs

    dataset = PreferencePairDataset(write_pair_table(tmp_path / "pairs.jsonl", 3), 32, drop_ties=False)

    class Brightness:  # prefers the brighter image; near-equal brightness -> a tie
        def score(self, images, prompts, t):
            return images.mean(dim=(1, 2, 3)) * 2

    relabelled = RelabelledPairs(dataset, Brightness(), threshold=0.1, progress=False)
    ties = []
    for i in range(len(dataset)):
        item, orig = relabelled[i], dataset[i]
        bw, bl = float(orig["pixels_w"].mean()) * 2, float(orig["pixels_l"].mean()) * 2
        gap = abs(torch.softmax(torch.tensor([bw, bl]), 0)[0] - torch.softmax(torch.tensor([bw, bl]), 0)[1])
        assert item["tie"] == bool(gap <= 0.1)
        ties.append(item["tie"])
        if not item["tie"]:
            assert float(item["pixels_w"].mean()) >= float(item["pixels_l"].mean())
            assert bl > bw  # the one decided pair here was labelled the other way round: it was swapped
    assert ties == [True, False, True]  # these three synthetic pairs: two near-ties, one swap


def test_cli_with_the_official_preset(tmp_path, capsys):
    from spoxl.commands.train_preference_model import PRESETS, main

    assert PRESETS == {"sd15": {"lr": 3e-6, "warmup": 500, "steps": 8000}, "sdxl": {"lr": 1e-6, "warmup": 500, "steps": 7000},
                       # LPO's LRM-XL (lpo.md 2): 8 GPUs of WarmupDecayLR over max_steps x world size, 1024 px
                       "lrm-sdxl": {"lr": 1e-5, "warmup": 1000, "steps": 8000, "decay_horizon": 8, "resolution": 1024}}
    pairs = write_pair_table(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "spm.safetensors"
    assert main(["--pairs", str(pairs), "--model", "tiny", "--clip", "tiny", "--resolution", "32", "--preset", "sdxl",
                 "--steps", "2", "--out", str(out)]) == 0  # fmt: skip
    assert out.is_file() and "pairwise accuracy by timestep" in capsys.readouterr().out
    assert main(["--pairs", str(pairs), "--model", "tiny", "--lr", "0", "--out", str(out)]) == 2
    assert "--lr > 0" in capsys.readouterr().err


def test_the_spoxl_command_runs_the_same_trainer(tmp_path):
    from spoxl.cli import main as spoxl

    pairs = write_pair_table(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "spm.safetensors"
    assert spoxl(["train-preference-model", "--pairs", str(pairs), "--resolution", "32", "--steps", "1",
                  "--out", str(out)]) == 0  # fmt: skip
    assert out.is_file()
    assert spoxl(["train-preference-model", "--pairs", str(tmp_path / "none.jsonl"), "--out", str(out)]) == 2
