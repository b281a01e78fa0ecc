"""Checkpoint folders: which ones `latest_checkpoint` takes, and retention of the last k plus every m-th."""

from __future__ import annotations

from pathlib import Path

from cpmtp_dist.training.checkpoint import (
    checkpoint_name,
    latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


def save(root: Path, step: int, **kw) -> Path:
    return save_checkpoint(root, step, model_state={}, meta={}, config_yaml="", tokenizer_dir=None, **kw)


def test_retention_keeps_the_last_k_and_every_m_th(tmp_path):
    for step in range(10, 110, 10):
        save(tmp_path, step, keep_last=2, keep_every=30)
    kept = sorted(p.name for p in tmp_path.glob("step_*"))
    assert kept == [checkpoint_name(s) for s in (30, 60, 90, 100)]
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [checkpoint_name(100)]


def test_latest_skips_unfinished_folders(tmp_path):
    save(tmp_path, 4)
    save(tmp_path, 8)
    (tmp_path / "step_0000012.tmp").mkdir()  # a save interrupted before its rename
    (tmp_path / "step_0000016").mkdir()  # a folder without meta.json
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(8)
    (tmp_path / "latest").unlink()  # the pointer lost too: the newest complete folder
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(8)
    assert latest_checkpoint(tmp_path / checkpoint_name(4)) == tmp_path / checkpoint_name(4)
