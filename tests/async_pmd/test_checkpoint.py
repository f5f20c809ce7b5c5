"""Checkpoint directories are never half-written: only renamed, complete ones are ever resumed."""

import pytest

from async_pmd import checkpoint


def test_commit_is_atomic_and_latest_ignores_tmp(tmp_path):
    run = tmp_path / "run"
    tmp = checkpoint.begin(run, 3)
    (tmp / "learner").mkdir()
    assert checkpoint.latest(run) is None  # a checkpoint being written is invisible
    final = checkpoint.commit(tmp, {"step": 3}, max_to_keep=2)
    assert final.name == "step_3" and not tmp.exists()
    assert checkpoint.latest(run) == final and checkpoint.read_state(final) == {"step": 3}
    crashed = checkpoint.begin(run, 4)  # a crash mid-write leaves only step_4.tmp
    (crashed / "learner").mkdir()
    assert checkpoint.latest(run) == final


def test_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3):
        checkpoint.commit(checkpoint.begin(tmp_path, step), {"step": step}, max_to_keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_3"]


def test_resolve_resume(tmp_path):
    assert checkpoint.resolve_resume("disable", tmp_path) is None
    assert checkpoint.resolve_resume("auto", tmp_path) is None  # nothing yet: start fresh
    final = checkpoint.commit(checkpoint.begin(tmp_path, 5), {"step": 5}, max_to_keep=1)
    assert checkpoint.resolve_resume("auto", tmp_path) == final
    assert checkpoint.resolve_resume(str(final), tmp_path) == final
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "nope"), tmp_path)
