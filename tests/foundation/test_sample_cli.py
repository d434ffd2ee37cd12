"""`spoxl sample` end to end: a real PNG for good input, one-line errors and exit != 0 for bad input."""

import subprocess
import sys

import pytest
from PIL import Image

from spoxl.cli import main


def test_sample_tiny_writes_png_grid(tmp_path):
    out = tmp_path / "grid.png"
    rc = main(["sample", "--model", "tiny", "--prompt", "a red circle", "--prompt", "a blue square",
               "--images-per-prompt", "2", "--steps", "4", "--out", str(out)])
    assert rc == 0
    img = Image.open(out)
    img.verify()
    img = Image.open(out)
    assert img.size == (2 * 64, 2 * 64) and img.mode == "RGB"
    # Not a blank canvas: a random model still produces varied pixels.
    assert len(set(img.getdata())) > 100


def test_sample_is_reproducible_and_seed_dependent(tmp_path):
    paths = []
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        p = tmp_path / f"{name}.png"
        assert main(["sample", "--prompt", "x", "--steps", "3", "--eta", "1", "--seed", str(seed), "--out", str(p)]) == 0
        paths.append(p.read_bytes())
    assert paths[0] == paths[1] and paths[0] != paths[2]


def test_sample_from_tiny_folder_equals_tiny_in_memory(tiny_dir, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["sample", "--model", "tiny", "--prompt", "x", "--steps", "3", "--out", str(a)]) == 0
    assert main(["sample", "--model", str(tiny_dir), "--prompt", "x", "--steps", "3", "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/does/not/exist", "--prompt", "x"], "model path /does/not/exist does not exist"),
        (["--prompts", "/no/prompts.txt"], "prompt file /no/prompts.txt does not exist"),
        ([], "no prompts"),
        (["--prompt", "x", "--lora", "/no/lora.safetensors"], "LoRA file /no/lora.safetensors does not exist"),
        (["--prompt", "x", "--out", "grid.jpg"], "must end in .png"),
    ],
)
def test_sample_bad_input_is_one_line_error(args, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "spoxl.cli", "sample", *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode != 0
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("spoxl sample: error:")]
    assert len(err_lines) == 1 and message in err_lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_sample_reads_spo_style_json_prompt_file(tmp_path, monkeypatch):
    import json

    import spoxl.imaging

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"caption": "a red circle"}, {"caption": "a blue square"}]))
    seen = {}

    def fake_sample_images(components, all_prompts, **kwargs):
        import torch

        seen["prompts"] = all_prompts
        return torch.zeros(len(all_prompts), 3, 8, 8)

    monkeypatch.setattr(spoxl.imaging, "sample_images", fake_sample_images)
    assert main(["sample", "--prompts", str(prompts), "--out", str(tmp_path / "g.png")]) == 0
    assert seen["prompts"] == ["a red circle", "a blue square"]
