"""`cpmtp train --nproc-per-node N`: the command launches its own ranks (torchrun in-process), equals the
same layout under torchrun, and passes a preemption's status 3 on (torchrun itself would report 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers.local import child_argv
from parity_config import PARITY
from runs import metrics_by_step as rows

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40
ARGS = [*PARITY, f"train.steps={STEPS}", "train.micro_batch_size=2", "train.eval_batches=2",
        "checkpoint.every=100", "parallel.tp=2", "tracking.enabled=false"]  # fmt: skip


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
def test_nproc_per_node_runs_the_ranks_and_passes_preemption_on(tmp_path):
    cache, run, ref = tmp_path / "cache", tmp_path / "run", tmp_path / "ref"
    cli = [sys.executable, "-m", "launchers.cli", "train", "--config", "configs/tiny.yaml", *ARGS]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                "-m", "launchers.cli", "train", "--config", "configs/tiny.yaml", *ARGS]  # fmt: skip
    reference = subprocess.Popen([*torchrun, "--run-dir", str(ref)], cwd=ROOT, env=env(cache),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    # SIGTERM to the one `cpmtp` process: its ranks checkpoint and stop, and it exits with status 3.
    with (tmp_path / "out.txt").open("w") as out:
        proc = subprocess.Popen([*cli, "--run-dir", str(run), "--nproc-per-node", "2"], cwd=ROOT,
                                env=env(cache), stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline:
            if (run / "metrics.jsonl").exists() and len(
                (run / "metrics.jsonl").read_text().splitlines()
            ) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "out.txt").read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 3, (tmp_path / "out.txt").read_text()[-3000:]
    log = (tmp_path / "out.txt").read_text()
    assert "tp=2" in log and "dp=1" in log  # two ranks, as tensor-parallel peers
    stopped = max(rows(run))
    assert 5 <= stopped < STEPS

    resumed = subprocess.run([*cli, "--run-dir", str(run), "--nproc-per-node", "2", "--resume", "auto"],
                             cwd=ROOT, env=env(cache), capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert reference.wait(timeout=600) == 0
    got, want = rows(run), rows(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6), step
