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
    base, moved, same = json.loads((out / "eval.json").read_text())["models"]
    assert moved["diff_mean"] != 0 and moved["diff_stderr"] > 0  # the LoRA changed the images
    assert same["diff_mean"] == 0  # ... and did not leak into the next model's (clean) copy


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
