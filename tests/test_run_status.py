"""`cpmtp status RUN_DIR` and the heartbeat it reads, on run directories written here (a trained one:
tests/test_inference_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path

from cpmtp_dist.config_io import load_config, save_config
from cpmtp_dist.run_status import format_duration, run_status, write_heartbeat
from launchers.cli import main

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def make_run(run: Path) -> Path:
    save_config(load_config(TINY, ["train.steps=100"]), run / "config.yaml")
    rows = [
        {"step": 10, "loss": 9.5, "tokens_per_s": 2500.0},
        {"step": 15, "event": "nonfinite_skip"},
        {"step": 20, "loss": 8.25, "tokens_per_s": 2600.0},
        {"step": 20, "eval_joint_loss": 8.5},
    ]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2'
    )  # mid-write
    ckpt = run / "checkpoints" / "step_0000020"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text('{"step": 20}')
    (run / "checkpoints" / "latest").write_text("step_0000020")
    last = write_heartbeat(run, "running", 20, 100, 95.0)
    write_heartbeat(run, "running", 20, 100, 95.0, last)  # a second beat: an interval
    return run


def test_status_of_a_running_run_and_of_a_dead_one(tmp_path):
    run = make_run(tmp_path / "run")
    beat = json.loads((run / "heartbeat.json").read_text())
    assert beat["state"] == "running" and beat["interval_s"] >= 0 and beat["total_steps"] == 100
    lines = run_status(run, now=beat["time"] + 10)
    assert lines[0] == f"{run}: step 20/100 (20 %)"
    assert lines[1].startswith("alive: yes: heartbeat 10s ago")
    assert lines[2] == "last loss 8.2500 at step 20; 2,600 tokens/s; eta 1m35s"
    assert lines[3] == "held-out joint loss 8.5000 at step 20"
    assert lines[4] == f"newest checkpoint: {run / 'checkpoints' / 'step_0000020'}"
    assert lines[5] == "health events: nonfinite_skip x1; the last: step 15 nonfinite_skip"
    stale = run_status(run, now=beat["time"] + 3600)
    assert stale[1].startswith("alive: no: the last heartbeat is 1h00m old") and "died or hangs" in stale[1]


def test_the_command_and_a_wrong_directory(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert main(["status", str(run)]) == 0
    assert capsys.readouterr().out.startswith(f"{run}: step 20/100")
    assert main(["status", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} holds no config.yaml")


def test_durations():
    assert [format_duration(s) for s in (None, 45, 750, 11100)] == ["-", "45s", "12m30s", "3h05m"]
