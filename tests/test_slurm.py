"""`slurm/train.sbatch` and `cpmtp submit` on a real Slurm cluster of two simulated nodes
(tests/slurm_cluster.py: each node a network namespace with its own address and slurmd), and `cpmtp submit`'s
checks of its arguments (no cluster needed).

Every job trains the parity model of the layout tests across both nodes and must log the same metrics, row
for row, as one process, after everything that happens to it: the warning signal before the time limit
(every rank on every node saves the same step; the job requeues itself and resumes) and, for the batch
script, a node lost mid-run (the survivors stop within a bounded time and name the lost ranks; the job
continues on the node that is left, at half the data-parallel size, from the newest checkpoint). The tests
wait on files (logs, metrics, submitit's results), never on job state: the test cluster keeps no accounting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import torch

from cpmtp_dist.training.checkpoint import read_model_state
from parity_config import PARITY
from runs import metrics_by_step as rows
from slurm_cluster import NodeNetwork, SlurmCluster, missing_binaries

ROOT = Path(__file__).resolve().parents[1]
STEPS, SIGNAL_AFTER, CHECKPOINT_EVERY = 30, 8, 10
ARGS = [
    *PARITY,
    f"train.steps={STEPS}",
    "train.micro_batch_size=2",
    "train.eval_every=0",
    "train.eval_batches=2",
    "tracking.enabled=false",
]
TIMEOUT = 300  # seconds for one job to reach what a test waits for
COLLECTIVE_TIMEOUT = 5  # parallel.timeout_s of the job that loses a node
NODE_LOSS_GRACE = 5  # the batch script's wait for the other nodes once one node's ranks ended


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> SlurmCluster:
    missing = missing_binaries()
    problem = f"Slurm is not installed ({', '.join(missing)}): run `python tests/slurm_cluster.py install`"
    if not missing and os.geteuid() != 0:
        problem = "the simulated Slurm nodes are network namespaces: they need root"
    if missing or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(problem)
        pytest.skip(problem)
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def env(cluster, tmp_path_factory) -> dict[str, str]:
    """The environment of the jobs (sbatch passes the submitting one on): this virtualenv first on PATH,
    one corpus cache for every run, gloo on the nodes' own interface."""
    return {
        **cluster.env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "CPMTP_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "PYTHONWARNINGS": "ignore",
        "GLOO_SOCKET_IFNAME": NodeNetwork.ifname,
    }


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory) -> Callable[[], Path]:
    """The same training in one process, outside Slurm. It starts at once and runs alongside the first job
    (a job leaves the two cores partly idle while it starts); calling the fixture waits for it."""
    root = tmp_path_factory.mktemp("local")
    with (root / "train.log").open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "launchers.cli", "train", "--config", "configs/tiny.yaml", "--run-dir",
             str(root / "run"), *ARGS],
            cwd=ROOT, env={**env, "CPMTP_CACHE_DIR": str(root / "cache")}, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def run_dir() -> Path:
        assert proc.wait(timeout=TIMEOUT) == 0, (root / "train.log").read_text()[-3000:]
        return root / "run"

    yield run_dir
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def assert_same_run(run: Path, ref: Path) -> None:
    """Every step's loss and gradient norm, the final held-out loss and the final weights, as one process
    (to ~1e-6, as the layout tests: `test_parallel_layouts.py`)."""
    got, want = rows(run), rows(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step, row in want.items():
        assert got[step]["loss"] == pytest.approx(row["loss"], abs=1e-5), step
        assert got[step]["grad_norm"] == pytest.approx(row["grad_norm"], rel=1e-4), step
    assert got[STEPS]["eval_joint_loss"] == pytest.approx(want[STEPS]["eval_joint_loss"], abs=1e-5)
    final = f"checkpoints/step_{STEPS:07d}"
    a, b = read_model_state(run / final), read_model_state(ref / final)
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(
            a[k], b[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"final weights {k}: {m}"
        )


def wait_for(condition: Callable[[], bool], what: str, cluster: SlurmCluster, *logs: Path) -> None:
    deadline = time.time() + TIMEOUT
    while not condition():
        if time.time() > deadline:
            tails = "".join(f"\n--- {p} ---\n{p.read_text()[-4000:]}" for p in logs if p.exists())
            pytest.fail(f"no {what} after {TIMEOUT} s; queue {cluster.jobs()}{tails}{cluster.logs()}")
        time.sleep(0.05)


def saved_after(log: str) -> int:
    """The step of the checkpoint that the warning signal made the ranks save."""
    stopped = re.search(r"checkpoint \S+ saved after step (\d+)", log)
    assert stopped, log[-4000:]
    step = int(stopped.group(1))
    assert SIGNAL_AFTER <= step < STEPS, "the signal must stop the run midway"
    return step


@pytest.mark.slow
def test_submit_across_two_nodes_checkpoints_requeues_and_completes(cluster, env, reference, tmp_path):
    """`cpmtp submit --nodes 2`, one task per node, two pipeline stages: one on each node. The rendezvous is
    the first node's address (NodeAddr); submitit's USR2 reaches the tasks on both nodes."""
    import submitit

    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "submit", "--nodes", "2", "--tasks-per-node", "1",
         "--cpus-per-task", "2", "--time", "10", "--signal-delay", "60", "--config", "configs/tiny.yaml",
         "--run-dir", str(run), *ARGS, "parallel.pp=2", "optim.zero_stage=1"],
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
    step = saved_after(log)
    # Requeued: the job started a second time and resumed. (Not submitit's "Requeued job" line: Slurm's
    # requeue can kill submitit's `scontrol requeue` before it logs, the requeue done all the same.)
    assert log.count(f"Starting with JobEnvironment(job_id={job_id},") == 2, log[-4000:]
    assert f"at step {step}" in log
    assert "tp=1 pp=2 ep=1 dp=1" in log
    for task in (0, 1):  # one pipeline stage on each node
        assert f"local_rank=0(1), node={task}(2), global_rank={task}(2)" in logs[2 * task].read_text()
    assert_same_run(run, reference())


@pytest.mark.slow
def test_sbatch_across_two_nodes_survives_the_warning_signal_and_a_lost_node(
    cluster, env, reference, tmp_path
):
    """tp=2 within each node x dp=2 across the two. USR2 before the time limit: every rank on both nodes
    saves the same step, the job requeues itself and resumes on both nodes. Then node n2 fails (its link goes
    down, its processes die): the ranks on n1 stop within the collective timeout, name ranks 2 and 3 on n2,
    and exit with status 5; the batch script gives n2 its grace, then continues on n1 alone (tp=2 x dp=1)
    from the newest checkpoint, and the run ends as one process would have trained it.

    Runs last in this module: n2 stays lost."""
    out, run = tmp_path / "job.out", tmp_path / "run"
    res = cluster.run(
        "sbatch", "--parsable", "--nodes=2", f"--output={out}", "--cpus-per-task=2", "slurm/train.sbatch",
        "configs/tiny.yaml", str(run), *ARGS, "parallel.tp=2", f"parallel.timeout_s={COLLECTIVE_TIMEOUT}",
        f"checkpoint.every={CHECKPOINT_EVERY}", cwd=ROOT,
        env={**env, "NPROC_PER_NODE": "2", "NODE_LOSS_GRACE": str(NODE_LOSS_GRACE)},
    )  # fmt: skip
    job = res.stdout.strip().split(";")[0]
    wait_for(lambda: len(rows(run)) >= SIGNAL_AFTER, f"{SIGNAL_AFTER} logged steps", cluster, out)
    # What `#SBATCH --signal=B:USR2@300` sends 300 s before the time limit: USR2 to the batch shell only.
    cluster.run("scancel", "--signal=USR2", "--batch", job)
    wait_for(lambda: "at step" in out.read_text(), "resumption after the requeue", cluster, out)
    step = saved_after(out.read_text())
    lose_after = step + 4
    wait_for(lambda: max(rows(run), default=0) >= lose_after, f"step {lose_after}", cluster, out)
    lost_at, lost_after = time.time(), max(rows(run))
    cluster.lose("n2")
    wait_for(lambda: "training step ended with status" in out.read_text(), "end of the job", cluster, out)

    log = out.read_text()
    addr = cluster.addresses["n1"]
    assert f"job {job} (restart 0): 2 node(s) x 2 rank(s) on n1 n2, rendezvous n1 ({addr}:" in log
    assert "tp=2 pp=1 ep=1 dp=2" in log
    assert f"requeueing job {job}" in log
    # Each node's launcher passed its ranks' status 3 (preempted) on, and none of the other attempts wrote one.
    statuses = {
        p.relative_to(run / ".nodes").as_posix(): p.read_text().strip() for p in (run / ".nodes").glob("*/*")
    }
    assert statuses == {
        f"{job}.0.0/n1": "3",
        f"{job}.0.0/n2": "3",
        f"{job}.1.0/n1": "5",
        f"{job}.1.1/n1": "0",
    }
    assert f"job {job} (restart 1): 2 node(s) x 2 rank(s) on n1 n2" in log
    assert f"at step {step}" in log
    # The survivors name the lost ranks (tp pairs stay within a node: ranks 2 and 3 are n2's) and stop.
    assert "lost rank(s) 2, 3 on node n2" in log, log[-4000:]
    assert "srun: error: n1: task 0: Exited with exit code 5" in log
    assert "node(s) n2 lost" in log and f"job {job} (restart 1): 1 node(s) x 2 rank(s) on n1," in log
    # Bounded: collective timeout + roll call + grace, with start-up and polling slack.
    lost_line = re.search(r"^(\S+) node\(s\) n2 lost", log, re.M).group(1)
    took = datetime.fromisoformat(lost_line).timestamp() - lost_at
    assert took < 2 * COLLECTIVE_TIMEOUT + NODE_LOSS_GRACE + 30, took
    resumed = re.findall(r"resumed from \S+ at step (\d+), resharded from layout \{[^}]*'dp': 2", log)
    assert len(resumed) == 1, log[-4000:]
    # What was lost: the steps after the newest checkpoint, at most the checkpoint interval.
    assert lost_after - CHECKPOINT_EVERY < int(resumed[0]) <= lost_after
    assert "tp=2 pp=1 ep=1 dp=1, accumulation 4" in log
    assert "training step ended with status 0" in log
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
