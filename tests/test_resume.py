"""A run killed with SIGKILL and resumed with `--resume auto` continues exactly as the uninterrupted run:
the same loss at every step and the same final weights, to the bit, in fp32 on the in-memory corpus and in
bf16 on streamed shards (loader workers, whose positions travel in the checkpoint, as do the fp32 master
weights and Adam moments of the bf16 run). An unfinished checkpoint folder left by a crash during a save is
ignored."""

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

from cpmtp_dist.training.checkpoint import read_model_state
from parity_config import PARITY
from runs import assert_fp32_optimizer_state, build_json_shards
from runs import metrics_by_step as rows

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


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return build_json_shards(tmp_path_factory.mktemp("shards"), "d")


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
    """The settings of a case: fp32 on the in-memory corpus, or bf16 on shards read by loader workers."""
    if source == "memory":
        return []
    return [f"data.path={shards}", "data.num_workers=2", "train.precision=bf16"]


def assert_same_run(run: Path, ref: Path, *, exact: bool = False) -> None:
    """The metrics and final weights of `run` are those of `ref`; with `exact`, to the bit, and the optimizer
    state (master weights, moments) as well."""
    got, want = rows(run), rows(ref)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        if exact:
            keys = ("loss", "joint_loss", "ntp_loss", "grad_norm", "lr", "eval_joint_loss")
            assert {k: got[step].get(k) for k in keys} == {k: want[step].get(k) for k in keys}, step
            continue
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-6), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-5), step
        if "eval_joint_loss" in want[step]:
            assert got[step]["eval_joint_loss"] == pytest.approx(want[step]["eval_joint_loss"], abs=1e-6)
    tol = 0 if exact else 1e-6
    prefix = "" if exact else "model."
    a = read_model_state(run / "checkpoints" / f"step_{STEPS:07d}", prefix)
    b = read_model_state(ref / "checkpoints" / f"step_{STEPS:07d}", prefix)
    assert a.keys() == b.keys()
    for k, v in b.items():
        if torch.is_tensor(v) and v.is_floating_point():
            torch.testing.assert_close(a[k], v, rtol=0, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


def start_and_signal(
    run: Path, extra: list[str], cache: Path, sig: int, after: int = KILL_AFTER
) -> tuple[int, str]:
    """Start a run, send it `sig` once it has logged step `after`; its exit status and output."""
    log = run.with_name(run.name + ".out")
    with log.open("w") as out:
        proc = subprocess.Popen(command(run, *extra), cwd=ROOT, env=env(cache), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.time() + 600
        while logged_steps(run) < after and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the signal"
        os.killpg(proc.pid, sig)
        proc.wait(timeout=300)
    return proc.returncode, log.read_text()


@pytest.mark.slow
def test_sigkill_and_resume_equals_the_uninterrupted_run(tmp_path, shards, reference):
    """bf16 on shards read by loader workers (the fp32 in-memory case is the kill during a save below)."""
    source = "shards_bf16"
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

    assert_same_run(run, ref, exact=True)
    assert_fp32_optimizer_state(read_model_state(run / "checkpoints" / f"step_{STEPS:07d}", ""))


def kill_during_save(run: Path, cache: Path, step: int) -> bool:
    """Start a run and SIGKILL it while checkpoint `step` is being written; whether the kill landed
    inside the save (its unfinished folder is left behind)."""
    tmp = run / "checkpoints" / f"step_{step:07d}.tmp"
    proc = subprocess.Popen(command(run), cwd=ROOT, env=env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.time() + 600
    while not tmp.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return tmp.exists() and not (run / "checkpoints" / f"step_{step:07d}").exists()


@pytest.mark.slow
def test_crash_during_a_save_keeps_the_previous_checkpoint(tmp_path, reference):
    """SIGKILL while the second checkpoint is written (fp32, the in-memory corpus): `latest` still names the
    first, `--resume auto` takes it (not the unfinished folder, nor a folder without meta.json) and the run
    ends as the uninterrupted one, to the bit."""
    cache = tmp_path / "cache"
    for attempt in range(3):  # the save takes ~0.1 s: a kill can land just after it; try again then
        run = tmp_path / f"run{attempt}"
        if kill_during_save(run, cache, 2 * EVERY):
            break
    else:
        pytest.fail("three kills all missed the checkpoint save")
    assert (run / "checkpoints" / "latest").read_text() == f"step_{EVERY:07d}"
    (run / "checkpoints" / "step_0000098").mkdir()  # a later folder without meta.json
    resumed = subprocess.run(command(run, "--resume", "auto"), cwd=ROOT, env=env(cache),
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {EVERY}" in resumed.stdout
    assert_same_run(run, reference("memory"), exact=True)


@pytest.mark.slow
def test_preemption_signals_save_and_exit_and_the_resumes_continue(tmp_path, reference):
    """SIGTERM, then SIGUSR2 during the resumed run: each saves a checkpoint at the step it stopped after
    and exits with status 3; the second resume ends as the uninterrupted run, to the bit. The checkpoints are
    written in the background (checkpoint.async_save), so they hold what the synchronous reference's hold."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    stopped = 0
    background = ["checkpoint.async_save=true"]
    for sig, after, extra in (
        (signal.SIGTERM, KILL_AFTER, background),
        (signal.SIGUSR2, 2 * KILL_AFTER, [*background, "--resume", "auto"]),
    ):
        returncode, out = start_and_signal(run, extra, cache, sig, after)
        assert returncode == 3, (sig, out[-3000:])
        if "--resume" in extra:
            assert f"at step {stopped}" in out, out[-3000:]
        stopped = logged_steps(run)
        assert after <= stopped < STEPS, sig
        assert f"checkpoint {run / 'checkpoints' / f'step_{stopped:07d}'} saved after step {stopped}" in out
    resumed = subprocess.run(command(run, *background, "--resume", "auto"), cwd=ROOT, env=env(cache),
                             capture_output=True, text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped}" in resumed.stdout
    assert_same_run(run, reference("memory"), exact=True)
