"""SLURM derivation with a fake SLURM environment, and the launch/ scripts' early checks and the
deepspeed command they build (SPOXL_DRY_RUN=1 prints it instead of launching)."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spoxl.cluster.slurm import derive, expand_nodelist, gpus_per_node
from spoxl.errors import SpoxlError

ROOT = Path(__file__).resolve().parents[2]
# The environment running the tests (a venv: sys.prefix) is the PYTHON_ENV the scripts check.
VENV = Path(sys.prefix) if (Path(sys.prefix) / "bin" / "deepspeed").exists() else ROOT / ".venv"
SCRIPTS = sorted(p.name for p in (ROOT / "launch").glob("*.sh")) + ["slurm.sbatch"]

FAKE_SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[01-04]",
    "SLURM_NNODES": "4",
    "SLURM_NODEID": "2",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURMD_NODENAME": "gpu03",
}


# ---- nodelist expansion ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[01-04]", ["gpu01", "gpu02", "gpu03", "gpu04"]),
        ("node7", ["node7"]),
        ("a[1-2,5],b[09-10]", ["a1", "a2", "a5", "b09", "b10"]),
        ("dgx-a100-[008-009],login2", ["dgx-a100-008", "dgx-a100-009", "login2"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-04", "gpu]01", "gpu[a-b]", "gpu[4-1]", ""])
def test_bad_nodelist_is_an_error(bad):
    with pytest.raises(SpoxlError):
        expand_nodelist(bad)


# ---- derivation --------------------------------------------------------------------------------


def test_derive_from_fake_slurm_env():
    launch = derive(FAKE_SLURM)
    assert launch.hosts == ["gpu01", "gpu02", "gpu03", "gpu04"]
    assert launch.master_addr == "gpu01"
    assert launch.node_rank == 2 and launch.nnodes == 4 and launch.gpus_per_node == 8
    assert launch.world_size == 32
    assert launch.master_port == 29500 + 4242 % 1000
    assert launch.hostfile_text() == "gpu01 slots=8\ngpu02 slots=8\ngpu03 slots=8\ngpu04 slots=8\n"


def test_explicit_master_port_and_addr_win():
    launch = derive({**FAKE_SLURM, "MASTER_PORT": "31000", "MASTER_ADDR": "10.0.0.1"})
    assert (launch.master_addr, launch.master_port) == ("10.0.0.1", 31000)


@pytest.mark.parametrize(
    "env, gpus",
    [
        ({"SLURM_GPUS_ON_NODE": "4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "a100:8"}, 8),
        ({"SLURM_GPUS_PER_NODE": "gpu:h100:2"}, 2),
        ({"SLURM_JOB_GPUS": "0,1,2"}, 3),
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, 2),
    ],
)
def test_gpus_per_node_sources(env, gpus):
    assert gpus_per_node(env) == gpus


@pytest.mark.parametrize(
    "change, words",
    [
        ({"SLURM_NNODES": "3"}, "SLURM_NNODES=3 but the nodelist names 4 hosts"),
        ({"SLURM_NODEID": "4"}, "outside the 4-node allocation"),
        ({"SLURM_GPUS_ON_NODE": ""}, "cannot tell the GPUs per node"),
        ({"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST / SLURM_NODELIST is not set"),
    ],
)
def test_inconsistent_slurm_env_is_one_line_error(change, words):
    with pytest.raises(SpoxlError, match=words):
        derive({**FAKE_SLURM, **change})


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK"))}
    env.update(extra)
    return env


def test_slurm_cli_prints_exports_and_writes_hostfile(tmp_path):
    hostfile = tmp_path / "hf"
    out = subprocess.run([sys.executable, "-m", "spoxl.cluster.slurm", "--hostfile", str(hostfile)],
                         env=_clean_env(**FAKE_SLURM), capture_output=True, text=True, check=True).stdout
    exported = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines())
    assert exported == {"MASTER_ADDR": "gpu01", "MASTER_PORT": "29742", "NODE_RANK": "2", "NNODES": "4",
                        "GPUS_PER_NODE": "8", "WORLD_SIZE": "32"}
    assert hostfile.read_text().splitlines() == [f"gpu0{i} slots=8" for i in range(1, 5)]
    # Outside SLURM: one line, exit 2.
    bad = subprocess.run([sys.executable, "-m", "spoxl.cluster.slurm"], env=_clean_env(),
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "SLURM_JOB_NODELIST" in bad.stderr


# ---- the launch scripts ------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_scripts_are_shellcheck_clean():
    result = subprocess.run(["shellcheck", "-x", *[f"launch/{s}" for s in SCRIPTS]], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _script(name, tmp_path, args=(), **env):
    env = _clean_env(**{"PYTHON_ENV": str(VENV), "SPOXL_DRY_RUN": "1", "TMPDIR": str(tmp_path), **env})
    return subprocess.run(["bash", str(ROOT / "launch" / name), *args], env=env, capture_output=True, text=True,
                          cwd=tmp_path)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("train: {max_steps: 1}\n")
    return str(path)


def test_slurm_node_script_builds_the_per_node_launch(tmp_path, recipe):
    r = _script("slurm_node.sh", tmp_path, ["--set", "train.max_steps=2"], CONFIG=recipe, **FAKE_SLURM)
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    hostfile = tmp_path / "spoxl-hostfile-4242"
    assert cmd[0] == str(VENV / "bin" / "deepspeed")
    assert cmd[1:] == ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", "2", "--master_addr", "gpu01",
                       "--master_port", "29742", "--module", "spoxl.train", "--config", recipe,
                       "--set", "train.max_steps=2"]
    assert hostfile.read_text().count("slots=8") == 4


def test_sbatch_script_runs_one_launcher_per_node_through_srun(tmp_path, recipe):
    # A stand-in srun: records its options, then runs the task once (as on node SLURM_NODEID).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nopts=()\nwhile [[ "$1" == --* ]]; do opts+=("$1"); shift; done\n'
                                  'echo "srun ${opts[*]}" >&2\nexec "$@"\n')
    (bin_dir / "srun").chmod(0o755)
    r = subprocess.run(["bash", str(ROOT / "launch" / "slurm.sbatch"), "--set", "train.max_steps=5"],
                       env=_clean_env(**FAKE_SLURM, SLURM_SUBMIT_DIR=str(ROOT), PYTHON_ENV=str(VENV), CONFIG=recipe,
                                      SPOXL_DRY_RUN="1", TMPDIR=str(tmp_path),
                                      PATH=f"{bin_dir}:{os.environ['PATH']}"),
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1 --wait=120" in r.stderr
    assert "spoxl slurm: node 2/4" in r.stderr and "world size 32, master gpu01:29742" in r.stderr
    cmd = shlex.split(r.stdout.strip().splitlines()[-1])
    assert cmd[cmd.index("--node_rank") + 1] == "2" and cmd[-2:] == ["--set", "train.max_steps=5"]


def test_single_node_script_command(tmp_path, recipe):
    r = _script("single_node.sh", tmp_path, ["--resume"], CONFIG=recipe, NUM_GPUS="4", MASTER_PORT="29601")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout.strip())[1:] == ["--num_gpus", "4", "--master_port", "29601", "--module",
                                                 "spoxl.train", "--config", recipe, "--resume"]


def test_pdsh_script_command_and_forwarded_env(tmp_path, recipe):
    # A stand-in pdsh on PATH (the real one is not needed for a dry run).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "pdsh").chmod(0o755)
    (tmp_path / "hosts").write_text("gpu01 slots=8\ngpu02 slots=8\n")
    r = _script("multi_node_pdsh.sh", tmp_path, ["--set", "train.lr=2e-5"], CONFIG=recipe, HOSTFILE="hosts",
                MASTER_ADDR="10.0.0.1", PATH=f"{bin_dir}:{os.environ['PATH']}", NCCL_SOCKET_IFNAME="ib0",
                SPOXL_WATCHDOG_TIMEOUT_S="90")
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout.strip().splitlines()[-1])[1:] == [
        "--hostfile", str(tmp_path / "hosts"), "--launcher", "pdsh", "--master_addr", "10.0.0.1",
        "--master_port", "29500", "--module", "spoxl.train", "--config", recipe, "--set", "train.lr=2e-5"]
    forwarded = dict(line.removeprefix("DS_ENV_FILE: ").split("=", 1) for line in r.stderr.splitlines()
                     if line.startswith("DS_ENV_FILE: "))
    # gloo follows NCCL's interface when it is a plain name; watchdog and NCCL teardown settings travel.
    assert forwarded["NCCL_SOCKET_IFNAME"] == forwarded["GLOO_SOCKET_IFNAME"] == "ib0"
    assert forwarded["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert forwarded["SPOXL_WATCHDOG_TIMEOUT_S"] == "90"
    assert "NCCL_IB_HCA" not in forwarded  # unset stays unset (NCCL then uses every HCA)


@pytest.mark.parametrize(
    "script, env, words",
    [
        ("single_node.sh", {"CONFIG": "missing.yaml"}, "CONFIG 'missing.yaml' does not exist"),
        ("single_node.sh", {"PYTHON_ENV": "/nonexistent-env"}, "PYTHON_ENV '/nonexistent-env' has no bin/python"),
        ("per_node.sh", {"HOSTFILE": "missing-hosts", "NODE_RANK": "0", "MASTER_ADDR": "h"},
         "HOSTFILE 'missing-hosts' does not exist"),
        ("per_node.sh", {"HOSTFILE": "HOSTS", "MASTER_ADDR": "h"}, "NODE_RANK must be a whole number"),
        ("per_node.sh", {"HOSTFILE": "BAD", "NODE_RANK": "0", "MASTER_ADDR": "h"}, "BAD:2: expected 'HOST slots=N'"),
        ("multi_node_pdsh.sh", {"HOSTFILE": "HOSTS"}, "MASTER_ADDR is not set"),
    ],
)
def test_scripts_fail_early_with_one_line(tmp_path, recipe, script, env, words):
    (tmp_path / "HOSTS").write_text("a slots=1\nb slots=1\n")
    (tmp_path / "BAD").write_text("a slots=1\nb slots\n")
    env = {k: str(tmp_path / v) if v in ("HOSTS", "BAD") else v for k, v in env.items()}
    words = words.replace("BAD:", f"{tmp_path / 'BAD'}:")
    env.setdefault("CONFIG", recipe)
    r = _script(script, tmp_path, **env)
    assert r.returncode == 2
    assert r.stdout == ""  # nothing was launched (dry run prints the command on stdout)
    assert words in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
