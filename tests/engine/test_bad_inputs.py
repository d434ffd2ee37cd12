"""Bad input, as a user types it: every case ends in exit code 2 with ONE line on stderr naming the
problem, never a traceback and never a silent acceptance.

Recipe cases run `spoxl train --dry-run` (the check before launch) in process through spoxl.cli.main,
which is what the console script calls: an exception that escaped the one-line handler would
fail the test as an error here, and would have been a traceback for the user. One case runs the
real console script to show the exit code reaches the shell.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spoxl.cli import main

REPO = Path(__file__).resolve().parents[2]
GOOD = (REPO / "configs" / "tiny_sft.yaml").read_text()
SPO = (REPO / "configs" / "tiny_spo.yaml").read_text()


def recipe(tmp_path, text: str | bytes, name="r.yaml") -> Path:
    p = tmp_path / name
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return p


def with_section(base: str, section: str, body: str) -> str:
    """base with `section:` replaced by body (a whole YAML block for that section)."""
    lines, out, skipping = base.splitlines(), [], False
    for line in lines:
        if line.startswith(f"{section}:"):
            skipping = True
            out.append(body.rstrip("\n"))
            continue
        if skipping and (line.startswith(" ") or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out) + "\n"


# (id, recipe text or bytes, extra --set overrides, a phrase the one-line error must contain)
RECIPES = [
    ("empty file", "", [], "is empty"),
    ("only comments", "# nothing\n", [], "holds no settings"),
    ("not utf-8", b"train:\n  lr: \xff\xfe\n", [], "not UTF-8"),
    ("binary", bytes(range(256)), [], "not UTF-8"),
    ("not yaml", "train: [1,\n", [], "not valid YAML"),
    ("top level is a list", "- train\n- lr\n", [], "must hold a mapping of sections"),
    ("section is a string", GOOD + "\n" + "export: diffusers\n", [], "section 'export' must be a mapping"),
    ("method is a name", with_section(GOOD, "method", "method: spo"), [], "section 'method' must be a mapping"),
    ("section twice", GOOD + "\ntrain:\n  lr: 1.0\n", [], "'train' is written twice"),
    ("key twice", GOOD.replace("train:\n", "train:\n  lr: 1.0\n  lr: 2.0\n", 1), [], "'lr' is written twice"),
    ("nan lr", GOOD, ["train.lr=.nan"], "train.lr must be a finite number"),
    ("inf grad clip", GOOD, ["train.grad_clip=.inf"], "train.grad_clip must be a finite number"),
    ("beta1 >= 1", GOOD, ["optim.betas=[1.0,0.999]"], "optim.betas must each be in [0, 1)"),
    ("negative beta2", GOOD, ["optim.betas=[0.9,-0.1]"], "optim.betas must each be in [0, 1)"),
    ("eps 0", GOOD, ["optim.eps=0"], "optim.eps must be > 0"),
    ("sample steps 0", GOOD, ["logging.sample_steps=0"], "logging.sample_steps must be > 0"),
    ("lr a word", GOOD, ["train.lr=fast"], "train.lr must be a number"),
    ("unknown key", GOOD, ["train.learning_rate=1e-4"], "unknown key train.learning_rate"),
    ("resolution not /8", GOOD, ["data.resolution=60"], "multiple of 8"),
    ("max minutes 0", GOOD, ["train.max_minutes=0"], "train.max_minutes must be a number > 0"),
    ("spo 0 steps", SPO, ["method.steps=0"], "steps"),
    ("spo pool of 1", SPO, ["method.pool_size=1"], "pool_size"),
    ("spo divert past the end", SPO, ["method.divert_start_step=50"], "divert_start_step"),
    ("spo clip judge without weights", SPO, ["method.preference.kind=clip", "method.preference.path=tiny"],
     "has no weights: an untrained step-aware CLIP ignores the timestep"),
    ("missing data file", GOOD, ["data.path=/nonexistent/pairs.parquet"], "/nonexistent/pairs.parquet"),
    ("ds config missing", GOOD, ["deepspeed.config=/nonexistent/ds.json"], "/nonexistent/ds.json"),
]


@pytest.mark.parametrize("text, overrides, phrase", [r[1:] for r in RECIPES], ids=[r[0] for r in RECIPES])
def test_bad_recipe_is_one_line_and_exit_2(tmp_path, capsys, text, overrides, phrase):
    path = recipe(tmp_path, text)
    argv = ["train", "--dry-run", "--num-gpus", "2", "--config", str(path)]
    for o in overrides:
        argv += ["--set", o]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert phrase in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_bad_files_handed_to_spo(tmp_path, capsys):
    binary = tmp_path / "prompts.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    code = main(["train", "--dry-run", "--num-gpus", "2", "--config", str(recipe(tmp_path, SPO)),
                 "--set", f"method.prompt_file={binary}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and str(binary) in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_ds_config_with_a_non_integer_field(tmp_path, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": "two"}, "train_micro_batch_size_per_gpu": "auto"}')
    code = main(["train", "--dry-run", "--num-gpus", "2", "--config", str(recipe(tmp_path, GOOD)),
                 "--set", f"deepspeed.config={ds}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "stage" in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_the_exit_code_reaches_the_shell(tmp_path):
    spoxl = Path(sys.executable).with_name("spoxl")
    r = subprocess.run([str(spoxl), "train", "--dry-run", "--config", str(recipe(tmp_path, ""))],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "is empty" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_version():
    spoxl = Path(sys.executable).with_name("spoxl")
    r = subprocess.run([str(spoxl), "--version"], capture_output=True, text=True, timeout=60)
    from spoxl import __version__

    assert r.returncode == 0 and r.stdout.strip() == f"spoxl {__version__}", (r.stdout, r.stderr)


def run_cli(capsys, argv) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def assert_one_line(code, err, phrase):
    assert code == 2, err
    assert phrase in err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_output_dir_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    code, err = run_cli(capsys, ["train", "--dry-run", "--config", str(recipe(tmp_path, GOOD)),
                                 "--set", f"run.output_dir={blocker}/run"])
    assert_one_line(code, err, f"{blocker} is a file")
    code, err = run_cli(capsys, ["train", "--dry-run", "--config", str(recipe(tmp_path, GOOD)),
                                 "--set", f"run.output_dir={tmp_path}/{'x' * 300}"])
    assert_one_line(code, err, "longer than 255 bytes")


@pytest.mark.parametrize("text, phrase", [
    ("worker-1 slots=two\n", "slots must be a positive integer"),
    ("worker-1 slots=8\nworker-1 slots=8\n", "already listed on line 1"),
    ("# nothing\n", "no hosts listed"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "not UTF-8"),
], ids=["slots word", "host twice", "empty", "binary"])
def test_bad_hostfile(tmp_path, capsys, text, phrase):
    hostfile = recipe(tmp_path, text, name="hostfile")
    code, err = run_cli(capsys, ["train", "--dry-run", "--hostfile", str(hostfile), "--config",
                                 str(recipe(tmp_path, GOOD))])
    assert_one_line(code, err, phrase)


def test_lora_that_does_not_fit_the_model(tmp_path, capsys):
    from safetensors.torch import save_file

    wrong_shape = tmp_path / "wrong_shape.safetensors"  # the tiny UNet's to_q is 32 -> 32 wide; this is 77 -> 8
    save_file({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(8, 77),
               "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(77, 8)},
              str(wrong_shape))
    wrong_keys = tmp_path / "wrong_keys.safetensors"
    save_file({"unet.no_such_block.proj.lora_A.weight": torch.zeros(4, 32),
               "unet.no_such_block.proj.lora_B.weight": torch.zeros(32, 4)}, str(wrong_keys))
    not_safetensors = recipe(tmp_path, b"PK\x03\x04 not a tensor file", name="garbage.safetensors")
    for path in (wrong_shape, wrong_keys, not_safetensors):
        code, err = run_cli(capsys, ["sample", "--model", "tiny", "--lora", str(path), "--steps", "1",
                                     "--prompt", "a red circle", "--out", str(tmp_path / "x.png")])
        assert_one_line(code, err, str(path))


def test_sample_out_under_a_regular_file(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = run_cli(capsys, ["sample", "--model", "tiny", "--steps", "1", "--prompt", "a red circle",
                                 "--out", str(blocker / "x.png")])
    assert_one_line(code, err, f"cannot be created: {blocker} is a file")


def test_every_flag_of_every_command_has_help():
    import argparse
    import importlib

    from spoxl.cli import COMMANDS

    missing = []
    for name, (module_name, _) in COMMANDS.items():
        parser = argparse.ArgumentParser(prog=f"spoxl {name}")
        importlib.import_module(module_name).add_arguments(parser)
        parsers = [(name, parser)]
        for action in parser._actions:  # subcommands (spoxl toy pretrain|export|pairs|captions)
            if isinstance(action, argparse._SubParsersAction):
                parsers += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
        for label, p in parsers:
            for action in p._actions:
                if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                    continue
                if not action.help:
                    missing.append(f"spoxl {label} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_cache_build_shows_progress(tmp_path, capsys, tiny_components):
    from spoxl.data.cache import CachedDataset
    from spoxl.data.synthetic import SyntheticCaptionDataset

    cache = CachedDataset(SyntheticCaptionDataset(6, 64), tiny_components, tmp_path, batch_size=2)
    assert cache.build(progress=True) == 6
    err = capsys.readouterr().err
    assert "latent cache (rank 0)" in err and "6/6" in err
    assert cache.build(progress=True) == 0 and "latent cache" not in capsys.readouterr().err  # nothing missing
