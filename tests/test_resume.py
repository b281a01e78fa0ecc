"""A run killed with SIGKILL and resumed with `--resume auto` continues exactly as the uninterrupted run:
the same loss at every step and the same final weights (fp32, CPU), on the in-memory corpus and on
streamed shards (loader workers, whose positions travel in the checkpoint). An unfinished checkpoint
folder left by a crash during a save is ignored."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from parity_config import PARITY

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY, KILL_AFTER = 30, 8, 12
ARGS = [
    *PARITY,
    f"train.steps={STEPS}",
    "train.micro_batch_size=2",
    "train.eval_batches=2",
    "train.eval_every=10",
    f"checkpoint.every={EVERY}",
    "checkpoint.keep_last=3",
]


def command(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "launchers.cli", "train", "--config", "configs/tiny.yaml", "--run-dir", str(run),
            *ARGS, *extra]  # fmt: skip


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, "CPMTP_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip()), default=0)


def rows(run: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["step"], {}).update(row)
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    code = str(Path(json.__file__).parent)
    for args in (
        ["data", "tokenizer", "--input", code, "--vocab-size", "400", "--out", str(root / "tok")],
        ["data", "shards", "--input", code, "--tokenizer", str(root / "tok"), "--seq-len", "32", "--out",
         str(root / "d"), "--shard-size-mb", "0.02", "--heldout-fraction", "0.2"],
    ):  # fmt: skip
        res = subprocess.run(
            [sys.executable, "-m", "launchers.cli", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert res.returncode == 0, res.stderr[-3000:]
    return root / "d"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards):
    """The uninterrupted run of each data source, run once."""
    done: dict[str, Path] = {}

    def get(source: str) -> Path:
        if source not in done:
            ref = tmp_path_factory.mktemp("ref") / source
            res = subprocess.run(command(ref, *data_args(source, shards)), cwd=ROOT,
                                 env=env(ref.parent / "cache"), capture_output=True, text=True)  # fmt: skip
            assert res.returncode == 0, res.stderr[-3000:]
            done[source] = ref
        return done[source]

    return get


def data_args(source: str, shards: Path) -> list[str]:
    return [] if source == "memory" else [f"data.path={shards}", "data.num_workers=2"]


def assert_same_run(run: Path, ref: Path) -> None:
    got, want = rows(run), rows(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-5), step
        if "eval_joint_loss" in want[step]:
            assert got[step]["eval_joint_loss"] == pytest.approx(want[step]["eval_joint_loss"], abs=1e-6)
    a = torch.load(run / "checkpoints" / f"step_{STEPS:07d}" / "model.pt", weights_only=True)
    b = torch.load(ref / "checkpoints" / f"step_{STEPS:07d}" / "model.pt", weights_only=True)
    for k, v in b.items():
        if torch.is_tensor(v) and v.is_floating_point():
            torch.testing.assert_close(a[k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def start_and_signal(run: Path, extra: list[str], cache: Path, sig: int) -> tuple[int, str]:
    """Start a run, send it `sig` once it has logged step KILL_AFTER; its exit status and output."""
    log = run.with_name(run.name + ".out")
    with log.open("w") as out:
        proc = subprocess.Popen(command(run, *extra), cwd=ROOT, env=env(cache), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.time() + 600
        while logged_steps(run) < KILL_AFTER and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the signal"
        os.killpg(proc.pid, sig)
        proc.wait(timeout=300)
    return proc.returncode, log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["memory", "shards"])
def test_sigkill_and_resume_equals_the_uninterrupted_run(tmp_path, shards, reference, source):
    extra = data_args(source, shards)
    cache = tmp_path / "cache"
    ref, run = reference(source), tmp_path / "run"

    start_and_signal(run, extra, cache, signal.SIGKILL)
    killed_at = logged_steps(run)
    assert EVERY < killed_at < STEPS
    # A crash during a later save leaves an unfinished folder; the resume must not take it.
    (run / "checkpoints" / "step_0000099.tmp").mkdir()
    (run / "checkpoints" / "step_0000098").mkdir()

    resumed = subprocess.run(command(run, *extra, "--resume", "auto"), cwd=ROOT, env=env(cache),
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last_ckpt = (killed_at // EVERY) * EVERY
    assert f"at step {last_ckpt}" in resumed.stdout

    assert_same_run(run, ref)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2], ids=["SIGTERM", "SIGUSR2"])
def test_preemption_signal_saves_and_exits_and_the_resume_continues(tmp_path, shards, reference, sig):
    cache, run = tmp_path / "cache", tmp_path / "run"
    returncode, out = start_and_signal(run, [], cache, sig)
    assert returncode == 3, out[-3000:]
    stopped = logged_steps(run)
    assert KILL_AFTER <= stopped < STEPS
    assert f"checkpoint {run / 'checkpoints' / f'step_{stopped:07d}'} saved after step {stopped}" in out
    resumed = subprocess.run(command(run, "--resume", "auto"), cwd=ROOT, env=env(cache),
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in resumed.stdout
    assert_same_run(run, reference("memory"))


@pytest.mark.slow
def test_resume_under_expert_parallelism(tmp_path):
    """ep2 (each rank holds its own CP components): resuming from the step-4 checkpoint of a run gives the
    steps 5..8 and final weights of that run."""
    layout = [
        "parallel.ep=2",
        "optim.zero_stage=1",
        "train.steps=8",
        "checkpoint.every=4",
        "train.eval_every=0",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cache = tmp_path / "cache"

    def launch(run: Path, *extra: str) -> None:
        cmd = [*torchrun, *command(run, *layout, *extra)[1:]]
        res = subprocess.run(cmd, cwd=ROOT, env=env(cache), capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]

    ref, run = tmp_path / "ref", tmp_path / "run"
    launch(ref)
    launch(run, "--resume", str(ref / "checkpoints" / "step_0000004"))
    got, want = rows(run), rows(ref)
    assert sorted(s for s in got if "loss" in got[s]) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6), step
    a = torch.load(run / "checkpoints" / "step_0000008" / "model.pt", weights_only=True)
    b = torch.load(ref / "checkpoints" / "step_0000008" / "model.pt", weights_only=True)
    for k, v in b.items():
        if torch.is_tensor(v) and v.is_floating_point():
            torch.testing.assert_close(a[k], v, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
