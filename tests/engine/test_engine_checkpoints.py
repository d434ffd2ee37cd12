"""Checkpoint folder bookkeeping without a launcher: pruning, and a fresh run refusing a used run dir."""

import pytest
import torch

from spoxl.engine import checkpoint
from spoxl.errors import SpoxlError


def _complete(ckpt, step):
    d = ckpt / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    (d / checkpoint.COMPLETE).write_text(str(step))


def test_prune_never_deletes_the_checkpoint_just_saved(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (10, 12):  # an older run's checkpoints, at higher step numbers
        _complete(ckpt, step)
    _complete(ckpt, 2)  # the new run's first save
    checkpoint._prune(ckpt, 2, "step_00000002")
    assert "step_00000002" in checkpoint.complete_tags(ckpt)
    (ckpt / checkpoint.LATEST).write_text("step_00000002")
    assert checkpoint.latest_tag(ckpt) == "step_00000002"


def test_fresh_run_in_a_run_dir_with_checkpoints_is_refused(tmp_path, monkeypatch):
    import spoxl.engine.setup
    from spoxl import train

    _complete(tmp_path / "checkpoints", 6)
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_text("step_00000006")

    def no_engine(*a, **k):
        raise AssertionError("the run dir must be checked before the engine is built")

    monkeypatch.setattr(spoxl.engine.setup, "build_training", no_engine)
    argv = ["--config", "configs/tiny_sft.yaml", "--set", f"run.output_dir={tmp_path}"]
    args = train.build_parser().parse_args(argv)
    with pytest.raises(SpoxlError, match="already holds checkpoints up to step 6") as e:
        train.run(args)
    assert "--resume" in str(e.value) and "\n" not in str(e.value)
    # With --resume the check does not apply (the engine would be built next).
    with pytest.raises(AssertionError, match="checked before the engine"):
        train.run(train.build_parser().parse_args([*argv, "--resume"]))


def test_resume_on_another_rank_count_warns_that_data_position_restarts(tmp_path):
    import torch

    from inprocess import make

    ctx, obj = make(tmp_path / "a", ["train.max_steps=1"])
    ctx.train()
    ckpt = tmp_path / "a" / "checkpoints"
    tag = checkpoint.save(ctx, obj, ckpt, keep_last=1)
    assert obj.state_dict() != {"epoch": 0, "index": 0}
    # Pretend it was saved on 2 ranks (what a universal resume 2 -> 1 rank meets).
    own = ckpt / tag / "spoxl_rank0.pt"
    state = torch.load(own, weights_only=True)
    torch.save({**state, "world_size": 2}, own)

    ctx2, obj2 = make(tmp_path / "b", ["train.max_steps=1"])
    assert checkpoint.load(ctx2, obj2, ckpt) == tag
    assert ctx2.global_step == 1
    assert obj2.state_dict() == {"epoch": 0, "index": 0}  # restarted, and the log says so:
    log = (tmp_path / "b" / "train.log").read_text()
    assert "saved on 2 rank(s), resuming on 1" in log and "data position" in log and "restart" in log


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "spoxl_rank0.pt"])
def test_resume_skips_a_truncated_latest_checkpoint_and_says_which_file(tmp_path, victim):
    from inprocess import make, trainable

    ctx, obj = make(tmp_path / "a", ["train.max_steps=1", "train.lr=1e-2"])
    ctx.train()
    ckpt = tmp_path / "a" / "checkpoints"
    first = checkpoint.save(ctx, obj, ckpt, keep_last=3)
    weights_at_first = trainable(ctx)
    ctx.config.train.max_steps = 2
    ctx.train()
    second = checkpoint.save(ctx, obj, ckpt, keep_last=3)
    assert checkpoint.latest_tag(ckpt) == second
    damaged = ckpt / second / victim
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # a copy cut short

    ctx2, obj2 = make(tmp_path / "b", ["train.max_steps=2"])
    assert checkpoint.load(ctx2, obj2, ckpt) == first
    assert ctx2.global_step == 1
    resumed = trainable(ctx2)
    assert all(torch.equal(resumed[k], weights_at_first[k]) for k in weights_at_first)
    log = (tmp_path / "b" / "train.log").read_text()
    assert str(damaged) in log and f"falling back to {first}" in log

    # Nothing whole left: one line, not a traceback from torch.load.
    for tag in (first,):
        f = ckpt / tag / "spoxl_rank0.pt"
        f.write_bytes(f.read_bytes()[:100])
    ctx3, obj3 = make(tmp_path / "c", ["train.max_steps=2"])
    with pytest.raises(SpoxlError, match="no checkpoint in .* can be resumed"):
        checkpoint.load(ctx3, obj3, ckpt)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_latest_stays(tmp_path, monkeypatch):
    from inprocess import make

    ctx, obj = make(tmp_path / "a", ["train.max_steps=1"])
    ctx.train()
    ckpt = tmp_path / "a" / "checkpoints"
    first = checkpoint.save(ctx, obj, ckpt, keep_last=3)
    ctx.global_step = 2

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(ckpt / "step_00000002" / "mp_rank_00_model_states.pt"))

    monkeypatch.setattr(ctx.engine, "save_checkpoint", disk_full)
    with pytest.raises(SpoxlError) as e:
        checkpoint.save(ctx, obj, ckpt, keep_last=3)
    message = str(e.value)
    assert "\n" not in message and "No space left on device" in message and "step_00000002" in message
    assert f"the newest whole checkpoint is still {first}" in message
    assert checkpoint.latest_tag(ckpt) == first
