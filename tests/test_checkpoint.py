"""Checkpoint folders: which ones `latest_checkpoint` takes, and retention of the last k plus every m-th."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import ShardedTensor

from cpmtp_dist.checkpoint_paths import latest_checkpoint
from cpmtp_dist.training.checkpoint import (
    checkpoint_name,
    prune_checkpoints,
    read_model_state,
    save_checkpoint,
)


@pytest.fixture(autouse=True)
def world_of_one(tmp_path_factory):
    """`dist_checkpointing` saves collectively: a gloo group of one process."""
    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def save(root: Path, step: int, **kw) -> Path:
    state = {"model.w": ShardedTensor.from_rank_offsets("model.w", torch.full((2, 3), float(step)))}
    return save_checkpoint(root, step, sharded_state=state, meta={}, config_yaml="", tokenizer_dir=None, **kw)


def test_retention_keeps_the_last_k_and_every_m_th(tmp_path):
    for step in range(10, 110, 10):
        save(tmp_path, step, on_commit=lambda: prune_checkpoints(tmp_path, 2, 30))
    kept = sorted(p.name for p in tmp_path.glob("step_*"))
    assert kept == [checkpoint_name(s) for s in (30, 60, 90, 100)]
    prune_checkpoints(tmp_path, keep_last=1)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [checkpoint_name(100)]


def test_latest_skips_unfinished_folders(tmp_path):
    save(tmp_path, 4)
    save(tmp_path, 8)
    (tmp_path / "step_0000012.tmp").mkdir()  # a save interrupted before its rename...
    (tmp_path / "step_0000012.tmp" / "meta.json").write_text("{}")  # ...after its meta.json
    (tmp_path / "step_0000016").mkdir()  # a folder without meta.json
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(8)
    (tmp_path / "latest").unlink()  # the pointer lost too: the newest complete folder
    assert latest_checkpoint(tmp_path) == tmp_path / checkpoint_name(8)
    assert latest_checkpoint(tmp_path / checkpoint_name(4)) == tmp_path / checkpoint_name(4)


def test_a_checkpoint_reads_back_in_one_process_without_a_group(tmp_path):
    folder = save(tmp_path, 7)
    assert (tmp_path / "latest").read_text() == folder.name and not list(tmp_path.glob("*.tmp"))
    dist.destroy_process_group()
    try:
        state = read_model_state(folder)
    finally:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert list(state) == ["w"] and torch.equal(state["w"], torch.full((2, 3), 7.0))
