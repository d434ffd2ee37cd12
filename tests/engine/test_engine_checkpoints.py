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
