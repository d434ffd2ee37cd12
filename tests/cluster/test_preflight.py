"""`spoxl preflight`: hostfile parsing, batch arithmetic, DeepSpeed memory estimates on the real
SDXL UNet config (meta device). In-process; no launcher, no weights."""

import json
import re

import pytest

from spoxl.cli import main
from spoxl.cluster.hostfile import Host, parse_hostfile, parse_hostfile_text, world_size
from spoxl.cluster.memory import ParamCounts, bundled_config, count_params, estimate
from spoxl.config import LoraConfig
from spoxl.errors import SpoxlError

SDXL_UNET_PARAMS = 2_567_463_684
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.fixture
def four_nodes(tmp_path):
    return _write(tmp_path / "hosts", "# the job's nodes\ngpu01 slots=8\n\ngpu02 slots=8  # spare PSU\n"
                                      "   gpu03   slots=8\ngpu04 slots = 8\n")


@pytest.fixture
def recipe(tmp_path):
    def make(**sections):
        data = {"model": {"path": str(tmp_path / "not-on-this-machine")}, "lora": {"enabled": False},
                "train": {"micro_batch_size": 1, "grad_accum": 8},
                "deepspeed": {"config": "zero2", "precision": "bf16"}}
        for k, v in sections.items():
            data.setdefault(k, {}).update(v)
        import yaml

        return _write(tmp_path / "recipe.yaml", yaml.safe_dump(data))

    return make


# ---- hostfile ----------------------------------------------------------------------------------


def test_hostfile_accepts_comments_blank_lines_and_spacing(four_nodes):
    hosts = parse_hostfile(four_nodes)
    assert hosts == [Host("gpu01", 8), Host("gpu02", 8), Host("gpu03", 8), Host("gpu04", 8)]
    assert world_size(hosts) == 32


@pytest.mark.parametrize(
    "text, line, words",
    [
        ("gpu01 slots=8\ngpu02\n", 2, "expected 'HOST slots=N'"),
        ("gpu01 slots=8\n\n# c\ngpu02 slot=8\n", 4, "expected 'HOST slots=N'"),
        ("gpu01 slots=0\n", 1, "positive integer"),
        ("gpu01 slots=eight\n", 1, "positive integer"),
        ("gpu01 slots=8\ngpu02 slots=8\ngpu01 slots=4\n", 3, "already listed on line 1"),
        ("gpu01 slots=8 gpu02 slots=8\n", 1, "expected 'HOST slots=N'"),
    ],
)
def test_malformed_hostfile_is_a_line_numbered_error(text, line, words):
    with pytest.raises(SpoxlError) as e:
        parse_hostfile_text(text, source="hf")
    assert str(e.value).startswith(f"hf:{line}: ") and words in str(e.value)
    assert "\n" not in str(e.value)


def test_empty_hostfile_is_an_error():
    with pytest.raises(SpoxlError, match="no hosts listed"):
        parse_hostfile_text("# only a comment\n\n")


def test_preflight_malformed_hostfile_one_line_exit_2(tmp_path, recipe, capsys):
    bad = _write(tmp_path / "bad", "gpu01 slots=8\ngpu02 slots=x\n")
    assert main(["preflight", "--hostfile", bad, "--config", recipe()]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("spoxl preflight: error: ") and f"{bad}:2:" in err


def test_preflight_missing_hostfile(tmp_path, recipe, capsys):
    assert main(["preflight", "--hostfile", str(tmp_path / "nope"), "--config", recipe()]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- batch arithmetic --------------------------------------------------------------------------


def test_impossible_global_batch_is_one_line_error(four_nodes, recipe, capsys):
    # 32 ranks x micro 1: 100 samples cannot be a whole number of micro-steps.
    assert main(["preflight", "--hostfile", four_nodes, "--config", recipe(), "--global-batch", "100"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "global batch 100 is impossible" in err and "32" in err


def test_wrong_grad_accum_names_the_fix(four_nodes, recipe, capsys):
    assert main(["preflight", "--hostfile", four_nodes, "--config", recipe(), "--global-batch", "512"]) == 2
    err = capsys.readouterr().err.strip()
    assert "1 x grad accumulation 8 x world size 32 = 256" in err and "train.grad_accum=16" in err


def test_ds_json_batch_that_contradicts_world_size(tmp_path, four_nodes, recipe, capsys):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 128, "zero_optimization": {"stage": 2}}))
    assert main(["preflight", "--hostfile", four_nodes, "--config", recipe(deepspeed={"config": str(ds)})]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train_batch_size=128" in err and "world size 32 = 256" in err


# ---- memory estimates on the real SDXL UNet ----------------------------------------------------


def _table(out: str) -> list[tuple[str, int, str, list[float]]]:
    rows = []
    for line in out.splitlines():
        m = re.match(r"^([* ]) +([0-3])  (\S+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+)$", line)
        if m:
            rows.append((m[1], int(m[2]), m[3], [float(m[i]) for i in range(4, 8)]))
    return rows


def test_preflight_full_finetune_sdxl_states_shrink_with_stage(four_nodes, recipe, capsys):
    assert main(["preflight", "--hostfile", four_nodes, "--config", recipe(), "--global-batch", "256",
                 "--no-activations"]) == 0
    out = capsys.readouterr().out
    assert "UNet 2,567,463,684 params (2.57B)" in out
    assert "bundled SDXL base 1.0 config" in out
    assert "global batch 256: OK" in out
    rows = _table(out)
    assert [r[1] for r in rows] == [0, 1, 2, 3]
    assert [r[0] for r in rows] == [" ", " ", "*", " "]  # the recipe is ZeRO-2
    gpu = [r[3][2] for r in rows]
    assert gpu[0] > gpu[1] > gpu[2] > gpu[3]
    # ZeRO-2 on 32 ranks, no offload: 2 B/param 16-bit weights + 18 B/param / 32 (DeepSpeed's breakdown).
    assert rows[2][3][0] == pytest.approx((2 + 18 / 32) * SDXL_UNET_PARAMS / 2**30, abs=0.01)
    # Unsharded: 20 B/param.
    assert rows[0][3][0] == pytest.approx(20 * SDXL_UNET_PARAMS / 2**30, abs=0.01)


def test_preflight_lora_zero3_offload(four_nodes, recipe, capsys):
    cfg = recipe(lora={"enabled": True, "rank": 8}, deepspeed={"config": "zero3_offload"})
    assert main(["preflight", "--hostfile", four_nodes, "--config", cfg, "--no-activations"]) == 0
    out = capsys.readouterr().out
    assert "UNet 2,567,463,684 params" in out and "11,612,160 trainable params" in out
    rows = _table(out)
    assert rows[-1][0] == "*" and rows[-1][1] == 3 and rows[-1][2] == "optimizer+params"
    # The frozen base UNet (bf16) is replicated below stage 3 and sharded by it.
    frozen = [r[3][1] for r in rows[:4]]
    assert frozen[0] == frozen[1] == frozen[2] > frozen[3]
    assert frozen[0] - frozen[3] == pytest.approx(2 * SDXL_UNET_PARAMS * (1 - 1 / 32) / 2**30, abs=0.02)


def test_param_counts_and_reference_copy():
    counts = count_params(bundled_config("unet"), LoraConfig(enabled=False))
    assert counts.base == counts.total == counts.trainable == SDXL_UNET_PARAMS
    assert counts.frozen_components == 83_653_863 + 123_060_480 + 694_659_840  # VAE + CLIP-L + OpenCLIP-bigG
    plain = estimate(counts, 2, 8, 4)
    with_ref = estimate(counts, 2, 8, 4, has_reference_copy=True)
    assert with_ref.frozen_gpu - plain.frozen_gpu == 2 * SDXL_UNET_PARAMS
    sharded = estimate(counts, 3, 8, 4, has_reference_copy=True)
    assert sharded.frozen_gpu - estimate(counts, 3, 8, 4).frozen_gpu == 2 * SDXL_UNET_PARAMS // 32


def test_estimate_rejects_unknown_stage():
    with pytest.raises(SpoxlError, match="ZeRO stage"):
        estimate(ParamCounts(10, 10, 10, 5, 0), 4, 1, 1)


def test_preflight_on_the_4node_example(four_nodes, capsys):
    """The README's 4 x 8 A100 example recipe is valid and its batch is what its comments say."""
    config = str(ROOT / "configs" / "spo_sdxl_4node.yaml")
    assert main(["preflight", "--hostfile", four_nodes, "--config", config, "--global-batch", "64"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch 2 x grad accumulation 1 x world size 32 = global batch 64: OK" in out
    assert "UNet 2,567,463,684 params" in out and "LoRA rank 64" in out and "method spo" in out
    assert [r[0] for r in _table(out)] == [" ", " ", "*", " "]
    # One micro-step: 2 pairs x 2 sources (the inner steps' winner and loser leave different x_t)
    # x (cond + uncond) = 8 UNet rows at 1024 px, checkpointed, bf16: ~4.9 GiB (2 rows: 1.22 GiB).
    m = re.search(r"activations  one spo micro-step, forward\+backward of 8 UNet row\(s\) at 1024 px, gradient "
                  r"checkpointing on: ([\d.]+) GiB", out)
    assert m and 4.0 < float(m[1]) < 6.0
    # Sampling: 2 prompts x pool 2 = 4 candidates, CFG-doubled, then 4 decodes by the fp32 VAE (~3 GiB each).
    sampling = re.search(r"sampling     no_grad forward of 8 UNet row\(s\), then the VAE decode of 4 image\(s\) "
                         r"\(fp32 VAE\): ([\d.]+) GiB at the larger", out)
    assert sampling and 10.0 < float(sampling[1]) < 14.0
    states = _table(out)[2][3][2]
    total = re.search(r"per rank     this recipe's model states ([\d.]+) \+ activations ([\d.]+) = ([\d.]+) GiB", out)
    assert total and float(total[1]) == states and float(total[2]) == max(float(m[1]), float(sampling[1]))
    assert float(total[3]) == pytest.approx(states + float(total[2]), abs=0.011)


def test_preflight_single_node_without_hostfile(recipe, capsys):
    assert main(["preflight", "--num-gpus", "8", "--config", recipe(train={"grad_accum": 4}), "--no-activations"]) == 0
    out = capsys.readouterr().out
    assert "--num-gpus: 1 node(s), 8 ranks (localhost)" in out
    assert "micro-batch 1 x grad accumulation 4 x world size 8 = global batch 32: OK" in out
    # ZeRO-2 on 8 ranks: 2 + 18/8 bytes per parameter.
    assert _table(out)[2][3][0] == pytest.approx((2 + 18 / 8) * SDXL_UNET_PARAMS / 2**30, abs=0.01)
