"""A 2-node job simulated on loopback: two deepspeed launchers started through launch/per_node.sh
(--no_ssh, --node_rank 0/1, --master_addr 127.0.0.1), one CPU rank each (gloo), training the tiny
SDXL with LoRA under ZeRO-2.

1. Both nodes agree on the weights: with DeepSpeed's node-local checkpoint storage each node's
   local rank 0 writes its own copy of the module into its own checkpoint folder; the two copies
   must be identical at every step, and must change between steps (training happened).
2. SIGKILL of node 1's rank mid-run ends BOTH launchers non-zero within the watchdog timeout,
   and node 0 names rank 1 as the cause.
3. A bad input on node 1 alone (its node-local copy of the data is missing): both nodes end
   non-zero within the watchdog timeout, each with ONE line naming the reason and no traceback.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
PYTHON_ENV = ROOT / ".venv"
WATCHDOG_TIMEOUT_S = 10

pytestmark = pytest.mark.launcher


def _recipe(tmp_path: Path, max_steps: int) -> Path:
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    # Each node's local rank 0 writes the module states into ITS checkpoint folder (DeepSpeed's
    # setting for clusters without a shared filesystem): one copy of the weights per node.
    ds["checkpoint"] = {"use_node_local_storage": True}
    (tmp_path / "zero2_node_local.json").write_text(json.dumps(ds))
    recipe = {
        "run": {"output_dir": str(tmp_path / "run"), "seed": 0},
        "model": {"path": "tiny"},
        "lora": {"enabled": True, "rank": 4, "alpha": 4},
        "train": {"max_steps": max_steps, "lr": 1e-2, "micro_batch_size": 1, "grad_accum": 1,
                  "dist_timeout_minutes": 10},
        "deepspeed": {"config": str(tmp_path / "zero2_node_local.json"), "precision": "fp32"},
        # save_final off: the engine decides on a final save from files in ITS checkpoint folder,
        # which differ per node with node-local storage (every=1 already saves the last step).
        "checkpoint": {"every": 1, "keep_last": 100, "save_final": False},
        "logging": {"tensorboard": False, "sample_every": 0, "progress": False},
        "data": {"synthetic_size": 4},
        "export": {"at_end": False},
        "method": {"name": "sft"},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _start_nodes(tmp_path: Path, recipe: Path, port: int, node1_args=(), node0_args=()) -> list[tuple[subprocess.Popen, Path]]:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    nodes = []
    for node_rank in (0, 1):
        env = {
            **os.environ,
            "PYTHON_ENV": str(PYTHON_ENV),
            "CONFIG": str(recipe),
            "HOSTFILE": str(hostfile),
            "NODE_RANK": str(node_rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": str(PYTHON_ENV / "torch_extensions"),
            "OMP_NUM_THREADS": "1",
            "SPOXL_WATCHDOG_TIMEOUT_S": str(WATCHDOG_TIMEOUT_S),
            "SPOXL_WATCHDOG_INTERVAL_S": "1",
        }
        log = tmp_path / f"node{node_rank}.log"
        proc = subprocess.Popen(
            ["bash", str(ROOT / "launch" / "per_node.sh"), "--set", f"checkpoint.dir={tmp_path / f'ckpt{node_rank}'}",
             *(node1_args if node_rank == 1 else node0_args)],
            env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        nodes.append((proc, log))
    return nodes


def _stop(nodes):
    for proc, _ in nodes:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _module_states(ckpt: Path, step: int) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt / f"step_{step:08d}" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)  # DeepSpeed's own file (our test's output): holds non-tensor metadata
    return state["module"]


def test_two_nodes_train_and_agree_on_weights(tmp_path, master_port):
    steps = 3
    nodes = _start_nodes(tmp_path, _recipe(tmp_path, steps), master_port)
    try:
        for proc, log in nodes:
            assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        _stop(nodes)
    assert "2 rank(s)" in (tmp_path / "run" / "train.log").read_text()
    first0, first1 = _module_states(tmp_path / "ckpt0", 1), _module_states(tmp_path / "ckpt1", 1)
    last0, last1 = _module_states(tmp_path / "ckpt0", steps), _module_states(tmp_path / "ckpt1", steps)
    assert first0.keys() == last1.keys() and any("lora" in k for k in first0)
    for name in first0:
        torch.testing.assert_close(first1[name], first0[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(last1[name], last0[name], rtol=0, atol=0, msg=name)
    assert any(not torch.equal(first0[k], last0[k]) for k in first0), "weights did not change while training"


def _rank_process(launcher: subprocess.Popen) -> psutil.Process:
    # The rank runs `python -u -m spoxl.train --local_rank=0 ...`; the deepspeed runner and
    # deepspeed.launcher.launch above it name the module after `--module`, not `-m`.
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if any(a == "-m" and b == "spoxl.train" for a, b in zip(cmd, cmd[1:])):
            return child
    raise AssertionError("rank process not found")


def test_sigkill_of_one_rank_ends_the_two_node_job(tmp_path, master_port):
    nodes = _start_nodes(tmp_path, _recipe(tmp_path, 10_000), master_port)
    try:
        first_ckpt = tmp_path / "ckpt0" / "step_00000001" / "spoxl_complete"
        deadline = time.monotonic() + 300
        while not first_ckpt.exists():
            assert time.monotonic() < deadline, (tmp_path / "node0.log").read_text()[-4000:]
            assert all(p.poll() is None for p, _ in nodes), "a node ended before the kill"
            time.sleep(0.5)
        victim = _rank_process(nodes[1][0])
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        codes = [proc.wait(timeout=120) for proc, _ in nodes]
        elapsed = time.monotonic() - killed_at
    finally:
        _stop(nodes)
    log0 = nodes[0][1].read_text()
    assert codes[0] != 0 and codes[1] != 0, codes
    assert elapsed < 120, elapsed
    assert "rank 1 (" in log0 and "stopped responding" in log0, log0[-4000:]


@pytest.mark.parametrize("bad_node", [1, 0])
def test_error_on_one_node_alone_ends_both_nodes_with_its_reason(tmp_path, master_port, bad_node):
    """One node's rank fails a check before any process group exists (its data path is missing,
    as on a cluster without a shared filesystem), while the other node's rank is fine and waits
    for it. The healthy node must not wait out the rendezvous timeout (10 minutes here) nor print a
    traceback: both nodes end within the watchdog's time, and the healthy node's last spoxl line
    carries the failing node's reason. When the failing rank is rank 0, the host of the job's store,
    it stays until the other rank has read the reason."""
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 0, 0)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"image {i}")
    missing = tmp_path / f"node{bad_node}_local" / "images"
    recipe = _recipe(tmp_path, 10_000)
    text = recipe.read_text().replace("synthetic_size: 4", f"path: {images}")
    recipe.write_text(text)
    started = time.monotonic()
    bad = ("--set", f"data.path={missing}")
    nodes = _start_nodes(tmp_path, recipe, master_port, **({"node1_args": bad} if bad_node == 1 else {"node0_args": bad}))
    try:
        codes = [proc.wait(timeout=240) for proc, _ in nodes]
    finally:
        _stop(nodes)
    elapsed = time.monotonic() - started
    logs = [log.read_text() for _, log in nodes]
    assert codes[0] != 0 and codes[1] != 0, (codes, logs[0][-3000:], logs[1][-3000:])
    reason = str(missing)
    for log in logs:
        assert "Traceback" not in log, log[-4000:]
        spoxl_lines = [line for line in log.splitlines() if line.startswith(("spoxl", "[spoxl"))]
        assert spoxl_lines and reason in spoxl_lines[-1], "\n".join(spoxl_lines[-6:])
    errors = [line for line in logs[bad_node].splitlines() if "spoxl train: error" in line]
    assert len(errors) == 1 and (("(rank 1)" in errors[0]) == (bad_node == 1)), logs[bad_node][-3000:]
    assert not [line for line in logs[1 - bad_node].splitlines() if "spoxl train: error" in line]
    assert elapsed < 60 + WATCHDOG_TIMEOUT_S + 30, elapsed  # launches (~20 s each, side by side) + the watchdog
