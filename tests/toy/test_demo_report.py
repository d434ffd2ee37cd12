"""report.md's verdict follows the paired figures: significant gain, significant loss, or neither."""

import pytest
import yaml

from spoxl.demo_report import write_report
from spoxl.errors import SpoxlError


def fake_run(tmp_path, ema: bool = True):
    """A run folder with the demo's config (or it with the EMA off) and its export files."""
    config = yaml.safe_load(open("configs/toy_spo.yaml"))
    assert config["ema"]["enabled"] is True  # the demo keeps an EMA; the plain run turns it off
    config["ema"]["enabled"] = ema
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "export" / "ema").mkdir(parents=True)
    (tmp_path / "export" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    if ema:
        (tmp_path / "export" / "ema" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    return tmp_path


def data(diff, se):
    row = {"model": "base", "lora": None, "mean": 50.0, "attributes": {}, "accuracy": {}}
    tuned = {"model": "spo", "lora": "x", "mean": 50.0 + diff, "base_mean": 50.0, "diff_mean": diff,
             "diff_stderr": se, "win_rate": 0.6, "win_rate_ci95": [0.5, 0.7], "n": 100, "attributes": {}, "accuracy": {}}
    return {"prompts": ["p"], "seeds": 4, "seed_offset": 0, "scorer": "fidelity",
            "sampler": {"steps": 20, "cfg_scale": 5.0, "eta": 0.0}, "models": [row, tuned]}


@pytest.mark.parametrize("diff, se, verdict", [(3.0, 1.0, "tuned > base"), (-3.0, 1.0, "tuned < base"),
                                                (0.5, 1.0, "no significant difference")])
def test_verdict(tmp_path, diff, se, verdict):
    run = fake_run(tmp_path)
    write_report(run, data(diff, se), grid="eval/grid.png")
    text = (run / "report.md").read_text()
    assert f"**Result: {verdict}**" in text and "eval/grid.png" in text


def test_report_needs_a_tuned_model(tmp_path):
    run = fake_run(tmp_path)
    d = data(1.0, 1.0)
    d["models"] = d["models"][:1]
    with pytest.raises(SpoxlError, match="no tuned model"):
        write_report(run, d, grid="g.png")


def test_the_report_names_the_recipe_it_ran(tmp_path):
    # the demo's recipe (configs/toy_spo.yaml): its branching step, lr and anchor are in the header
    run = fake_run(tmp_path)
    write_report(run, data(1.0, 1.0), grid="g.png")
    text = (run / "report.md").read_text()
    assert "branching from step 15" in text and "lr 0.001" in text and "early-step anchor weight 50.0" in text
    assert "sampling rounds under bf16 autocast" in text
    assert "branching from step 15 (2 times from each prompt's state)" in text
    assert "early-step anchor weight 50.0 on 8 pairs per micro-batch" in text


def test_the_demo_judges_the_ema_lora_when_the_recipe_keeps_one(tmp_path, capsys):
    from spoxl.demo_report import main

    ema_run = fake_run(tmp_path / "ema")
    assert main(["--run", str(ema_run), "--lora-path"]) == 0
    assert capsys.readouterr().out.strip() == str(ema_run / "export" / "ema" / "pytorch_lora_weights.safetensors")
    write_report(ema_run, data(1.0, 1.0), grid="g.png")
    assert "EMA of the LoRA weights (decay 0.97)" in (ema_run / "report.md").read_text()

    plain = fake_run(tmp_path / "plain", ema=False)
    assert main(["--run", str(plain), "--lora-path"]) == 0
    assert capsys.readouterr().out.strip() == str(plain / "export" / "pytorch_lora_weights.safetensors")
    write_report(plain, data(1.0, 1.0), grid="g.png")
    assert "EMA" not in (plain / "report.md").read_text()

    (ema_run / "export" / "ema" / "pytorch_lora_weights.safetensors").unlink()  # an EMA run without its export
    assert main(["--run", str(ema_run), "--lora-path"]) == 2
    assert "has no LoRA export" in capsys.readouterr().err
