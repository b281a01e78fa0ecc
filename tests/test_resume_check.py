"""Resuming with settings the checkpoint cannot continue fails before anything is built, listing every such
setting (layout, schedule, logging and checkpoint cadence may change): on folders with the files the check reads
(config.yaml, meta.json). Damaged checkpoints: a run trained here in this process, its files then cut short
or changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cpmtp_dist.checkpoint_paths import ResumeError, newest_verified_checkpoint, verify_checkpoint
from cpmtp_dist.config_io import load_config, save_config
from cpmtp_dist.resume_check import check_resume_config, resume_conflicts
from cpmtp_dist.run_status import run_status
from launchers.cli import main
from parity_config import PARITY

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


# --- damaged checkpoints -----------------------------------------------------------------------------------

SAVED = [*PARITY, "train.steps=3", "checkpoint.every=1", "checkpoint.keep_last=3", "train.eval_batches=1",
         "tracking.enabled=false"]  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A one-process run that checkpointed steps 1, 2 and 3 (in this process, as `cpmtp train` would)."""
    root = tmp_path_factory.mktemp("integrity")
    mp = pytest.MonkeyPatch()
    mp.setenv("CPMTP_CACHE_DIR", str(root / "cache"))
    mp.chdir(ROOT)
    assert main(["train", "--config", str(TINY), "--run-dir", str(root / "run"), *SAVED]) == 0
    mp.undo()
    return root / "run"


def test_meta_json_records_every_file_of_a_checkpoint(saved):
    for step in (1, 2, 3):
        ckpt = saved / "checkpoints" / f"step_{step:07d}"
        files = json.loads((ckpt / "meta.json").read_text())["files"]
        on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "meta.json"}
        assert set(files) == on_disk and "state/__0_0.distcp" in files and "rng/rank_00000.pt" in files
        assert verify_checkpoint(ckpt, full=True) is None


def test_a_damaged_checkpoint_is_named_and_resume_auto_takes_an_older_one(
    saved, tmp_path, capsys, monkeypatch
):
    run = shutil.copytree(saved, tmp_path / "run")
    ckpts = run / "checkpoints"
    newest = ckpts / "step_0000003" / "state" / "__0_0.distcp"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # half of it lost
    flipped = ckpts / "step_0000002" / "state" / "__0_0.distcp"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    flipped.write_bytes(bytes(data))
    assert str(newest) in verify_checkpoint(ckpts / "step_0000003") and "truncated" in verify_checkpoint(
        ckpts / "step_0000003"
    )
    assert verify_checkpoint(ckpts / "step_0000002") is None  # sizes only
    assert "CRC-32" in verify_checkpoint(ckpts / "step_0000002", full=True)
    assert newest_verified_checkpoint(ckpts) == (
        ckpts / "step_0000002",
        [verify_checkpoint(ckpts / "step_0000003")],
    )
    assert newest_verified_checkpoint(ckpts, full=True)[0] == ckpts / "step_0000001"

    monkeypatch.setenv("CPMTP_CACHE_DIR", str(saved.parent / "cache"))
    monkeypatch.chdir(ROOT)
    # A named damaged checkpoint: refused before anything is built, the file named.
    args = ["train", "--config", str(TINY), "--run-dir", str(run), *SAVED]
    assert main([*args, "--resume", str(ckpts / "step_0000003")]) == 2
    assert f"error: --resume {ckpts / 'step_0000003'}: {newest} holds" in capsys.readouterr().err
    # --resume auto with a full check: the newest checkpoint that verifies, step 1, and the run goes on.
    assert main([*args, "--resume", "auto", "--verify-checkpoint", "full"]) == 0
    out = capsys.readouterr()
    assert "a damaged checkpoint is skipped" in out.err and str(newest) in out.err and "CRC-32" in out.err
    assert f"resumed from {ckpts / 'step_0000001'} at step 1" in out.out
    assert verify_checkpoint(ckpts / "step_0000003", full=True) is None  # written again
    status = "\n".join(run_status(run))
    assert "health events: damaged_checkpoint_skipped x2" in status
