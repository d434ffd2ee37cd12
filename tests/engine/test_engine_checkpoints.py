"""Checkpoint folder bookkeeping without a launcher: pruning, and a fresh run refusing a used run dir."""

import pytest

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
    from spoxl.engine import loop

    ctx, obj = make(tmp_path / "a", ["train.max_steps=1"])
    loop.train(ctx, obj, ctx.logger)
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
