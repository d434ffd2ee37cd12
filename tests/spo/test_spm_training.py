"""Training the step-aware preference model: the PickScore pair loss learns; predicted-x0 inputs
share noise between w and l. (The tiny random VAE destroys image content, so the learning test
feeds clean pixels; the predicted-x0 path is tested for its own contract.)"""

import math

import torch

from spoxl.data.pairs import PreferencePairDataset
from spoxl.data.synthetic import write_pair_table
from spoxl.models.preference import StepAwareCLIP
from spoxl.spo.spm_training import predicted_x0_images, spm_loss, train_spm
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
