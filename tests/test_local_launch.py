"""`cpmtp train --nproc-per-node N`: the command launches its own ranks (torchrun in-process), equals the
same layout under torchrun, and passes a preemption's status 3 on (torchrun itself would report 1): the
ranks save a checkpoint of the step they stopped at."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.local import child_argv
from layout_runs import LAYOUTS, SMALL, STEPS
from runs import metrics_by_step as rows

ROOT = Path(__file__).resolve().parents[1]
# The session's tp2 parity run (tests/layout_runs.py, launched by torchrun) is the reference.
NPROC, TP2, _ = LAYOUTS["tp2"]
ARGS = [*SMALL, *TP2, "tracking.enabled=false"]


def env(cache: Path) -> dict[str, str]:
    out = {**os.environ, "CPMTP_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    return out


def test_child_arguments_drop_the_flag_and_fix_the_run_dir():
    assert child_argv(["train", "--nproc-per-node", "2", "--config", "c.yaml", "a=1"], "runs/x") == [
        "train", "--config", "c.yaml", "a=1", "--run-dir", "runs/x"
    ]  # fmt: skip
    assert child_argv(["train", "--nproc-per-node=4", "--run-dir", "r", "a=1"], "ignored") == [
        "train", "--run-dir", "r", "a=1"
    ]  # fmt: skip


@pytest.mark.slow
def test_nproc_per_node_runs_the_ranks_and_passes_preemption_on(tmp_path, layout_runs):
    run = tmp_path / "run"
    cli = [sys.executable, "-m", "launchers.cli", "train", "--config", "configs/tiny.yaml", *ARGS]

    # SIGTERM to the one `cpmtp` process once its ranks train: they checkpoint and stop, and it exits with 3.
    with (tmp_path / "out.txt").open("w") as out:
        proc = subprocess.Popen([*cli, "--run-dir", str(run), "--nproc-per-node", str(NPROC)], cwd=ROOT,
                                env=env(layout_runs.cache), stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline and not rows(run):
            time.sleep(0.02)
        assert proc.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 3, (tmp_path / "out.txt").read_text()[-3000:]
    log = (tmp_path / "out.txt").read_text()
    assert "tp=2" in log and "dp=1" in log  # two ranks, as tensor-parallel peers
    stopped = max(rows(run))
    assert 1 <= stopped < STEPS
    assert f"checkpoint {run / 'checkpoints' / f'step_{stopped:07d}'} saved after step {stopped}" in log
    # The steps before the signal are torchrun's. (Resuming such a checkpoint is the same for ranks that any
    # launcher started: tests/test_resume.py, and across nodes tests/test_slurm.py.)
    got, want = rows(run), rows(layout_runs.layout("tp2"))
    assert sorted(got) == list(range(1, stopped + 1))
    for step in got:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6), step
