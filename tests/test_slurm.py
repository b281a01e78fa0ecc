"""`slurm/train.sbatch` and `cpmtp submit` on a real one-node Slurm cluster (tests/slurm_cluster.py), and
`cpmtp submit`'s checks of its arguments (no cluster needed).

Every job trains the same two-rank run (dp=2) as a local `torchrun --nproc-per-node 2`, and must log the
same metrics row for row after the warning signal made it checkpoint, requeue itself and resume. The tests wait on files (logs, metrics, submitit's results), never on job state: the
test cluster keeps no accounting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from parity_config import PARITY
from runs import metrics_by_step as rows
from slurm_cluster import SlurmCluster, missing_binaries

ROOT = Path(__file__).resolve().parents[1]
STEPS, SIGNAL_AFTER = 100, 10  # ~10 steps/s on 2 cores: the signal lands with most of the run ahead
ARGS = [
    *PARITY,
    f"train.steps={STEPS}",
    "train.micro_batch_size=2",
    "train.eval_every=0",
    "train.eval_batches=2",
    "tracking.enabled=false",
]
TIMEOUT = 300  # seconds for one job to reach what a test waits for (a run takes about a minute)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SlurmCluster:
    missing = missing_binaries()
    if missing:
        message = (
            f"Slurm is not installed ({', '.join(missing)}): run `python tests/slurm_cluster.py install`"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory) -> dict[str, str]:
    """The environment of the jobs (sbatch passes the submitting one on): this virtualenv first on PATH,
    one corpus cache for every run."""
    return {
        **cluster.env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "CPMTP_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "PYTHONWARNINGS": "ignore",
    }


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> Callable[[], Path]:
    """The same training under a local torchrun, outside Slurm. It starts at once and runs alongside the
    first job (a run leaves the two cores half idle while it starts); calling the fixture waits for it."""
    root = tmp_path_factory.mktemp("local")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    with (root / "torchrun.log").open("w") as log:
        proc = subprocess.Popen(
            [*torchrun, "-m", "launchers.cli", "train", "--config", "configs/tiny.yaml", "--run-dir",
             str(root / "run"), *ARGS],
            cwd=ROOT, env={**env, "CPMTP_CACHE_DIR": str(root / "cache")}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def run_dir() -> Path:
        assert proc.wait(timeout=TIMEOUT) == 0, (root / "torchrun.log").read_text()[-3000:]
        return root / "run"

    yield run_dir
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def assert_same_run(run: Path, ref: Path) -> None:
    got, want = rows(run), rows(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, row in want.items():
        assert got[step]["loss"] == pytest.approx(row["loss"], abs=1e-6), step
        assert got[step]["grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-5), step
    assert got[STEPS]["eval_joint_loss"] == pytest.approx(want[STEPS]["eval_joint_loss"], abs=1e-6)


def wait_for(condition: Callable[[], bool], what: str, cluster: SlurmCluster, *logs: Path) -> None:
    deadline = time.time() + TIMEOUT
    while not condition():
        if time.time() > deadline:
            tails = "".join(f"\n--- {p} ---\n{p.read_text()[-4000:]}" for p in logs if p.exists())
            pytest.fail(f"no {what} after {TIMEOUT} s; queue {cluster.jobs()}{tails}{cluster.logs()}")
        time.sleep(0.05)


def sbatch(cluster: SlurmCluster, env: dict[str, str], out: Path, run: Path) -> str:
    res = cluster.run(
        "sbatch", "--parsable", f"--output={out}", "--cpus-per-task=2", "slurm/train.sbatch",
        "configs/tiny.yaml", str(run), *ARGS, cwd=ROOT, env={**env, "NPROC_PER_NODE": "2"},
    )  # fmt: skip
    return res.stdout.strip().split(";")[0]


def ended(out: Path) -> Callable[[], bool]:
    return lambda: out.exists() and "training step ended with status" in out.read_text()


@pytest.mark.slow
def test_sbatch_trains_two_ranks_and_a_warning_signal_checkpoints_requeues_and_resumes(
    cluster, env, reference, tmp_path
):
    """The batch script runs two ranks (as a local torchrun would); USR2 before the time limit makes them
    checkpoint, the job requeues itself and resumes, and the run ends as the uninterrupted torchrun run."""
    out, run = tmp_path / "job.out", tmp_path / "run"
    job = sbatch(cluster, env, out, run)
    wait_for(lambda: len(rows(run)) >= SIGNAL_AFTER, f"{SIGNAL_AFTER} logged steps", cluster, out)
    # What `#SBATCH --signal=B:USR2@300` sends 300 s before the time limit: USR2 to the batch shell only.
    cluster.run("scancel", "--signal=USR2", "--batch", job)
    wait_for(ended(out), "end of the requeued job", cluster, out)

    log = out.read_text()
    assert "1 node(s) x 2 rank(s)" in log
    stopped = re.search(r"checkpoint \S+ saved after step (\d+)", log)
    assert stopped, log[-4000:]
    step = int(stopped.group(1))
    assert SIGNAL_AFTER <= step < STEPS, "the signal must stop the run midway"
    assert f"requeueing job {job}" in log
    assert f"job {job} (restart 1)" in log
    assert f"at step {step}" in log  # "resumed from .../step_N at step N"
    assert "training step ended with status 0" in log
    assert_same_run(run, reference())


@pytest.mark.slow
def test_submit_through_submitit_checkpoints_requeues_and_completes(cluster, env, reference, tmp_path):
    import submitit

    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "submit", "--tasks-per-node", "2", "--cpus-per-task", "1",
         "--time", "10", "--signal-delay", "60", "--config", "configs/tiny.yaml", "--run-dir", str(run), *ARGS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = re.search(r"submitted job (\d+)", res.stdout).group(1)
    folder = run / "submitit" / job_id
    logs = [folder / f"{job_id}_{t}_log.{kind}" for t in (0, 1) for kind in ("out", "err")]

    wait_for(lambda: len(rows(run)) >= SIGNAL_AFTER, f"{SIGNAL_AFTER} logged steps", cluster, *logs)
    # What `--signal=USR2@60` (submitit's sbatch) sends 60 s before the time limit: USR2 to every task.
    cluster.run("scancel", "--signal=USR2", job_id)
    results = [folder / f"{job_id}_{t}_result.pkl" for t in (0, 1)]
    wait_for(lambda: all(p.exists() for p in results), "results of both tasks", cluster, *logs)

    job = submitit.SlurmJob(folder=folder, job_id=job_id, tasks=(0, 1))
    assert job.results() == [str(run), str(run)]
    log = logs[0].read_text()
    step = int(re.search(r"checkpoint \S+ saved after step (\d+)", log).group(1))
    assert SIGNAL_AFTER <= step < STEPS, "the signal must stop the run midway"
    # Requeued: the job started a second time and resumed. (Not submitit's "Requeued job" line: Slurm's
    # requeue can kill submitit's `scontrol requeue` before it logs, the requeue done all the same.)
    assert log.count(f"Starting with JobEnvironment(job_id={job_id},") == 2, log[-4000:]
    assert f"at step {step}" in log
    assert_same_run(run, reference())


# -- `cpmtp submit` without a cluster -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text, minutes",
    [("90", 90), ("1:30", 2), ("0:30", 1), ("4:00:00", 240), ("1-0", 1440), ("2-03:04", 2 * 1440 + 184)],
)
def test_submit_reads_slurm_time_formats(text, minutes):
    from launchers.submit import parse_time_minutes

    assert parse_time_minutes(text) == minutes


def test_submit_lists_every_problem_before_submitting(tmp_path, capsys):
    from launchers.cli import main

    (tmp_path / "run" / "checkpoints" / "step_0000004").mkdir(parents=True)
    status = main(
        ["submit", "--nodes", "0", "--gpus-per-node", "2", "--tasks-per-node", "3", "--time", "1:00",
         "--signal-delay", "90", "--config", "configs/tiny.yaml", "--run-dir", str(tmp_path / "run")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2
    for problem in ("--nodes 0", "one task per GPU", "--signal-delay 90 s", "already holds checkpoints"):
        assert problem in err, err
    assert main(["submit", "--time", "1:2:3:4", "--config", "configs/tiny.yaml"]) == 2
    assert "--time '1:2:3:4'" in capsys.readouterr().err


def test_submit_checks_the_config_for_the_jobs_world_size(capsys):
    from launchers.cli import main

    args = [
        "submit",
        "--tasks-per-node",
        "3",
        "--time",
        "10",
        "--config",
        "configs/tiny.yaml",
        "parallel.tp=2",
    ]
    assert main(args) == 2
    assert "world_size = --nodes 1 x 3 tasks per node" in capsys.readouterr().err


def test_a_requeued_job_continues_from_the_run_directory(tmp_path):
    from launchers.submit import TrainJob

    run = tmp_path / "run"
    first = TrainJob(["--config", "c.yaml", "--run-dir", str(run), "x=1", "--resume", "/other/run/step_9"])
    # Requeued before its first checkpoint: it still starts from the checkpoint it was given.
    assert first.checkpoint().function.train_args == first.train_args
    (run / "checkpoints" / "step_0000004").mkdir(parents=True)
    (run / "checkpoints" / "step_0000004" / "meta.json").write_text("{}")
    requeued = first.checkpoint().function
    assert requeued.train_args == ["--config", "c.yaml", "--run-dir", str(run), "x=1", "--resume", "auto"]
    assert requeued.run_dir == str(run)
