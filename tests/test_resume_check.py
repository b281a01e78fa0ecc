"""Resuming with settings the checkpoint cannot continue fails before anything is built, listing every such
setting; layout, schedule, logging and checkpoint cadence may change. The checkpoints here are folders with
the files the check reads (config.yaml, meta.json); no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpmtp_dist.checkpoint_paths import ResumeError
from cpmtp_dist.config_io import load_config, save_config
from cpmtp_dist.resume_check import check_resume_config, resume_conflicts
from launchers.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def fake_checkpoint(folder: Path, overrides: list[str], **meta) -> Path:
    save_config(load_config(TINY, overrides), folder / "config.yaml")
    (folder / "meta.json").write_text(json.dumps({"step": 4, **meta}))
    return folder


def test_only_the_model_data_and_objective_must_stay():
    saved = load_config(TINY, ["data.path=/shards/a"])
    allowed = ["parallel.tp=2", "optim.lr=3e-4", "optim.zero_stage=1", "train.steps=900", "checkpoint.every=7",
               "train.log_every=1", "train.micro_batch_size=4", "tracking.enabled=false", "data.num_workers=0"]  # fmt: skip
    assert resume_conflicts(saved, load_config(TINY, ["data.path=/shards/a", *allowed])) == []
    changed = load_config(TINY, ["model.cp.rank=8", "train.seed=5", "model.trunk.dropout=0.1"])
    assert resume_conflicts(saved, changed) == [
        "data.path: '/shards/a' in the checkpoint, None now",
        "model.cp.rank: 4 in the checkpoint, 8 now",
        "model.trunk.dropout: 0.0 in the checkpoint, 0.1 now",
        "train.seed: 1234 in the checkpoint, 5 now",
    ]


def test_check_names_the_checkpoint_and_what_to_do(tmp_path):
    ckpt = fake_checkpoint(tmp_path / "step_0000004", [])
    check_resume_config(ckpt, load_config(TINY, ["train.steps=500"]))  # passes
    with pytest.raises(ResumeError) as err:
        check_resume_config(ckpt, load_config(TINY, ["model.cp.rank=8"]))
    assert str(err.value).startswith(f"--resume {ckpt}: these settings differ")
    assert "model.cp.rank: 4 in the checkpoint, 8 now" in str(err.value)
    assert f"finetune.init_from={ckpt}" in str(err.value)
    converted = fake_checkpoint(tmp_path / "hf", [], converted_from="hf/Llama")
    with pytest.raises(ResumeError, match="holds weights only"):
        check_resume_config(converted, load_config(TINY))


def test_cpmtp_train_refuses_before_building_anything(tmp_path, capsys):
    """The command of a user who resumes a rank-4 run on shards with model.cp.rank=8 and without data.path,
    the overrides after an option: one message with both settings, status 2, no traceback."""
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoints" / "step_0000004", ["data.path=/shards/a"])
    argv = ["train", "--config", str(TINY), "--run-dir", str(run), "--resume", "auto", "model.cp.rank=8",
            "--tracking-uri", "none", "train.steps=10"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume") and "Traceback" not in err, err
    assert "model.cp.rank: 4 in the checkpoint, 8 now" in err and "data.path: '/shards/a'" in err
    assert "train.steps" not in err
    assert not (run / "metrics.jsonl").exists()
