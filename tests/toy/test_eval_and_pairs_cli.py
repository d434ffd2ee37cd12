"""`spoxl eval` and `spoxl toy pairs` end to end on the toy model (few steps, few prompts)."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from spoxl.cli import main
from spoxl.data.pairs import PreferencePairDataset
from spoxl.models.loading import load_sdxl
from spoxl.toy import world
from spoxl.toy.scorers import ToyScorer

FAST = ["--steps", "4", "--num-prompts", "3", "--seeds", "2"]


def make_lora(out, b_std: float):
    """A LoRA on the toy UNet; b_std 0 keeps peft's zero B matrices (the tuned model IS the base)."""
    import peft
    from spoxl.engine.export import export_lora

    unet = load_sdxl("toy").unet
    unet.add_adapter(peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights=True, target_modules=["to_q", "to_v"]))
    if b_std:
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=b_std, generator=torch.Generator().manual_seed(0))
    export_lora(unet, out, formats=("diffusers",))
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def identity_lora(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("lora0"), 0.0)


@pytest.fixture(scope="module")
def moved_lora(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("lora1"), 0.5)


def test_eval_table_json_and_grid(tmp_path, identity_lora, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--model", "toy", "--lora", str(identity_lora), "--name", "same", *FAST, "--out", str(out)]) == 0
    data = json.loads((out / "eval.json").read_text())
    base, same = data["models"]
    assert base["model"] == "base" and same["model"] == "same" and len(data["prompts"]) == 3
    assert set(data["prompts"]) <= set(world.held_out_captions())
    # a zero LoRA draws the very same images: every pair ties, win rate exactly 1/2, difference 0
    assert same["diff_mean"] == 0 and same["win_rate"] == 0.5 and same["n"] == 6
    assert set(base["accuracy"]) == {"colour", "shape", "position", "size"} and "fidelity" in base["attributes"]
    grid = Image.open(out / "grid.png")
    assert grid.size == ((2 * 2 + 1) * 64, 3 * 64)  # 2 blocks of 2 seeds + a spacer, 3 prompt rows
    printed = capsys.readouterr().out
    assert "win rate" in printed and "| same |" in printed


def test_eval_applies_each_lora_to_its_own_copy(tmp_path, identity_lora, moved_lora):
    out = tmp_path / "ev"
    assert main(["eval", "--model", "toy", "--lora", str(moved_lora), "--lora", str(identity_lora),
                 "--name", "moved", "--name", "same", *FAST, "--out", str(out)]) == 0
    data = json.loads((out / "eval.json").read_text())
    base, moved, same = data["models"]
    assert moved["diff_mean"] != 0 and moved["diff_stderr"] > 0  # the LoRA changed the images
    assert same["diff_mean"] == 0  # ... and did not leak into the next model's (clean) copy
    # the per-item scores ([prompt][seed]) are the ones the summary was computed from
    items = {name: torch.tensor(v, dtype=torch.float64) for name, v in data["per_item"].items()}
    assert all(v.shape == (3, 2) for v in items.values())
    diff = items["moved"] - items["base"]
    assert moved["diff_mean"] == pytest.approx(float(diff.mean()))
    assert moved["win_rate"] == pytest.approx(float((diff > 0).double().mean() + 0.5 * (diff == 0).double().mean()))
    assert data["per_prompt"]["moved"] == pytest.approx(items["moved"].mean(1).tolist())


def test_eval_bad_inputs_are_one_line_errors(tmp_path, capsys):
    for args, message in [
        (["--lora", str(tmp_path / "missing.safetensors")], "does not exist"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--scorer", "nope"], "unknown preference model"),
        (["--prompts", str(tmp_path / "none.txt")], "none.txt"),
        (["--name", "x"], "--name"),
        (["--lora", __file__, "--lora", __file__, "--name", "a", "--name", "a"], "distinct"),
        (["--lora", __file__, "--name", "base"], "distinct"),
    ]:
        assert main(["eval", "--steps", "2", "--num-prompts", "1", *args, "--out", str(tmp_path / "o")]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (args, err)


def test_toy_pairs_labels_by_the_scorer_in_pick_a_pic_layout(tmp_path):
    out = tmp_path / "pairs.parquet"
    assert main(["toy", "pairs", "--model", "toy", "--n", "12", "--steps", "4", "--margin", "0.5",
                 "--out", str(out)]) == 0
    table = pq.read_table(out).to_pylist()
    assert len(table) == 12
    assert {r["label_0"] for r in table} == {0.0, 1.0}  # the winner's side is not constant
    for r in table:
        assert (r["label_0"] == 1.0) == (r["score_0"] > r["score_1"]) and abs(r["score_0"] - r["score_1"]) >= 0.5
        assert r["caption"] in {s.caption() for s in world.train_scenes()}
    # the pairs load as spoxl's Pick-a-Pic dataset, and its winner is the higher-scoring image
    ds = PreferencePairDataset(out, resolution=64)
    scorer = ToyScorer()
    item = ds[0]
    s_w = scorer.score(item["pixels_w"][None], [item["caption"]], 0)
    s_l = scorer.score(item["pixels_l"][None], [item["caption"]], 0)
    assert float(s_w) > float(s_l)
    assert main(["toy", "pairs", "--n", "2", "--out", str(tmp_path / "x.csv")]) == 2


def test_counterfactual_pairs_are_exact_renderings_against_one_wrong_attribute(tmp_path):
    out = tmp_path / "cf.parquet"
    assert main(["toy", "pairs", "--source", "counterfactual", "--prompts", "held-out", "--n", "40",
                 "--seed", "3", "--out", str(out)]) == 0
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 40 and {r["label_0"] for r in rows} == {0.0, 1.0}
    assert {r["caption"] for r in rows} <= set(world.held_out_captions())
    assert {r["changed"] for r in rows} == {"colour", "shape", "position", "size", "background"}
    ds = PreferencePairDataset(out, resolution=64)
    scorer = ToyScorer()
    for i, r in enumerate(rows):
        item = ds[i]
        # the winner as loaded is the image labelled preferred, and the scorer agrees: it is the
        # caption's scene, the loser gets the changed attribute wrong and every other one right
        labelled = r["jpg_0"] if r["label_0"] == 1.0 else r["jpg_1"]
        assert torch.equal(item["pixels_w"], _pixels(labelled))
        pair = torch.stack([item["pixels_w"], item["pixels_l"]])
        s_w, s_l = scorer.score(pair, [r["caption"]] * 2, 0).tolist()
        assert s_w > s_l, (r["caption"], r["changed"], s_w, s_l)
        correct = scorer.correct(pair, [r["caption"]] * 2)  # colour, shape, position, size
        assert all(bool(v[0]) for v in correct.values()), (r["caption"], correct)
        if r["changed"] == "background":  # the classifier reads the object against the NAMED background
            continue
        for attribute, right in correct.items():  # the loser gets the changed one wrong, the rest right
            assert bool(right[1]) == (attribute != r["changed"]), (r["caption"], r["changed"], correct)
    # the same seed gives the same pairs; bad attribute names and bad captions are one-line errors
    again = tmp_path / "again.parquet"
    assert main(["toy", "pairs", "--source", "counterfactual", "--prompts", "held-out", "--n", "40",
                 "--seed", "3", "--out", str(again)]) == 0
    assert pq.read_table(again).to_pylist() == rows
    assert main(["toy", "pairs", "--source", "counterfactual", "--attributes", "colour,hue", "--n", "2",
                 "--out", str(tmp_path / "bad.parquet")]) == 2
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n")
    assert main(["toy", "pairs", "--source", "counterfactual", "--prompts", str(prompts), "--n", "2",
                 "--out", str(tmp_path / "bad2.parquet")]) == 2


def _pixels(png: bytes) -> torch.Tensor:
    import io

    from spoxl.data.images import to_pixels

    return to_pixels(Image.open(io.BytesIO(png)).convert("RGB"))
