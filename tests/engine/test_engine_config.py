"""Config loading and ds_config building: pure Python, no processes."""

import json

import pytest

from spoxl.config import load_config
from spoxl.engine.ds_config import build_ds_config
from spoxl.errors import SpoxlError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_yaml_and_overrides_are_typed(tmp_path):
    p = write(tmp_path, "c.yaml", "train:\n  lr: 1.0e-3\n  micro_batch_size: 2\nmethod:\n  name: sft\n  snr_gamma: 5\n")
    cfg = load_config(p, ["train.lr=2e-5", "lora.target_modules=[to_q,to_v]", "lora.enabled=false",
                          "deepspeed.precision=bf16"])
    assert cfg.train.lr == 2e-5 and isinstance(cfg.train.lr, float)
    assert cfg.train.micro_batch_size == 2
    assert cfg.lora.target_modules == ["to_q", "to_v"] and cfg.lora.enabled is False
    assert cfg.method.name == "sft" and cfg.method.params.snr_gamma == 5.0
    assert cfg.to_dict()["method"] == {"name": "sft", "snr_gamma": 5.0, "fixed_noise": False}


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "unknown key train.lrr"),
    (["nosection.x=1"], "unknown key nosection"),
    (["method.beta=1"], "unknown key method.beta"),
    (["train.micro_batch_size=1.5"], "train.micro_batch_size must be an integer"),
    (["train.lr=fast"], "train.lr must be a number"),
    (["lora.enabled=maybe"], "lora.enabled must be true or false"),
    (["deepspeed.precision=fp8"], "deepspeed.precision must be one of"),
    (["train.grad_accum=0"], "train.grad_accum must be > 0"),
    (["method.name=nosuch"], "unknown method 'nosuch'"),
    (["train"], "expected section.key=value"),
    (["export.formats=[kohya]", "lora.enabled=false"], "LoRA format"),
    (["train.host_mmap_threshold_mib=64"], "train.host_mmap_threshold_mib must be in (0, 32]"),
    (["train.host_mmap_threshold_mib=0"], "train.host_mmap_threshold_mib must be in (0, 32]"),
])
def test_bad_values_are_one_line_errors(overrides, message):
    with pytest.raises(SpoxlError) as e:
        load_config(None, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(SpoxlError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(SpoxlError, match="not valid YAML"):
        load_config(write(tmp_path, "bad.yaml", "train: [1,\n"))


def ds_for(tmp_path, ds: dict, overrides=(), world=2):
    path = write(tmp_path, "ds.json", json.dumps(ds))
    cfg = load_config(None, [f"deepspeed.config={path}", *overrides])
    return build_ds_config(cfg, world)


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload", "zero3_lowmem", "zero3_lowmem_full"])
def test_shipped_ds_configs_resolve_every_auto(name):
    cfg = load_config(None, [f"deepspeed.config=ds_configs/{name}.json", "train.micro_batch_size=3",
                             "train.grad_accum=2", "train.grad_clip=0.5", "deepspeed.precision=bf16"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(ds)


def test_clipping_is_always_explicit(tmp_path):
    # DeepSpeed >= 0.19.3 would clip at 1.0 if the key were missing.
    ds = ds_for(tmp_path, {"zero_optimization": {"stage": 2}}, ["train.grad_clip=0"])
    assert ds["gradient_clipping"] == 0.0


def test_contradictions_are_rejected(tmp_path):
    with pytest.raises(SpoxlError, match="train_batch_size=5 does not equal"):
        ds_for(tmp_path, {"train_batch_size": 5, "zero_optimization": {"stage": 2}}, ["train.micro_batch_size=2"])
    with pytest.raises(SpoxlError, match="gradient_accumulation_steps=4 but the recipe gives 1"):
        ds_for(tmp_path, {"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 2}})
    with pytest.raises(SpoxlError, match="bf16.enabled=True but deepspeed.precision is fp32"):
        ds_for(tmp_path, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    with pytest.raises(SpoxlError, match="'optimizer' section"):
        ds_for(tmp_path, {"optimizer": {"type": "Adam"}, "zero_optimization": {"stage": 2}})
    with pytest.raises(SpoxlError, match="stage must be 1, 2 or 3"):
        ds_for(tmp_path, {"zero_optimization": {"stage": 0}})
    with pytest.raises(SpoxlError, match="wall_clock_breakdown is 'auto'"):
        ds_for(tmp_path, {"wall_clock_breakdown": "auto", "zero_optimization": {"stage": 2}})


def test_agreeing_values_and_8bit_flag(tmp_path):
    ds = ds_for(tmp_path, {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}},
                ["train.micro_batch_size=2", "train.grad_accum=2", "optim.name=adamw8bit"])
    assert ds["train_batch_size"] == 8
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 100_000


def test_unknown_ds_config_name():
    cfg = load_config(None, ["deepspeed.config=zero9"])
    with pytest.raises(SpoxlError, match="zero9 does not exist"):
        build_ds_config(cfg, 1)
    assert build_ds_config(load_config(None, ["deepspeed.config=zero3"]), 1)["zero_optimization"]["stage"] == 3


def test_spoxl_train_builds_the_deepspeed_command():
    import argparse

    from spoxl.commands.train import add_arguments, launcher_command

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--config", "configs/tiny_sft.yaml", "--num-gpus", "2", "--master-port", "29123",
                              "--set", "train.lr=1e-5", "--resume", "--launcher-args=--no_ssh_check"])
    cmd = launcher_command(args)
    assert cmd[0].endswith("deepspeed")
    assert cmd[1:] == ["--num_gpus", "2", "--master_port", "29123", "--no_ssh_check", "--module", "spoxl.train",
                       "--config", "configs/tiny_sft.yaml", "--set", "train.lr=1e-5", "--resume"]
    args = parser.parse_args(["--config", "c.yaml", "--hostfile", "hosts", "--master-port", "1"])
    assert launcher_command(args)[1:3] == ["--hostfile", "hosts"]
