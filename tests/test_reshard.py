"""A checkpoint saved at one layout resumes at another: the model, the Adam moments, the step counts and
the learning-rate schedule are resliced, so the resumed steps equal the saving run's own next steps.

Each case trains 8 steps at the source layout (checkpoints at 4 and 8), then resumes its step-4
checkpoint at the target layout for steps 5..8. The source layouts equal one process to ~1e-6
(`test_parallel_layouts.py`), so the target must match the source's steps 5..8, its held-out loss and
its final weights to that accuracy; a resume that restarted Adam or the schedule would be off by far
more (checked: with the moments left at zero, the losses of steps 6..8 are off by 2e-3 to 7e-3).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpmtp_dist.training.checkpoint import read_model_state
from parity_config import PARITY
from runs import metrics_by_step as rows

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    *PARITY,
    "train.steps=8",
    "train.micro_batch_size=2",
    "train.eval_batches=2",
    "checkpoint.every=4",
]
# name: (processes and settings that save, processes and settings that resume)
# Llama-style trunk (grouped-query attention, SwiGLU, untied output layer) in two cases: the gated MLP's
# first projection holds each tp rank's slice of both halves, resliced both ways.
LLAMA = ["model.trunk.num_query_groups=2", "model.trunk.mlp=swiglu", "model.trunk.untie_embeddings=true"]
CASES = {
    "tp2_to_tp1_llama": ((2, ["parallel.tp=2", *LLAMA]), (1, LLAMA)),
    "pp2_to_pp1": ((2, ["parallel.pp=2", "optim.zero_stage=1"]), (1, ["optim.zero_stage=1"])),
    "ep2_to_ep1": ((2, ["parallel.ep=2", "optim.zero_stage=1"]), (1, ["optim.zero_stage=1"])),
    # The source writes its checkpoints in the background (checkpoint.async_save).
    "dp2_zero2_to_tp2_llama": (
        (2, ["optim.zero_stage=2", "checkpoint.async_save=true", *LLAMA]),
        (2, ["parallel.tp=2", *LLAMA]),
    ),
    # Same layout: ZeRO fragments of expert-parallel components go back where they came from, to the bit.
    "ep2_to_ep2": (
        (2, ["parallel.ep=2", "optim.zero_stage=1"]),
        (2, ["parallel.ep=2", "optim.zero_stage=1"]),
    ),
}


def launch(run: Path, nproc: int, settings: list[str], cache: Path, *extra: str) -> str:
    env = {**os.environ, "CPMTP_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    args = ["train", "--config", "configs/tiny.yaml", *ARGS, *settings, "--run-dir", str(run), *extra]
    cmd = [sys.executable, "-m", "launchers.cli", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "launchers.cli", *args]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_resume_at_another_layout(case, tmp_path):
    (src_n, src), (dst_n, dst) = CASES[case]
    cache, ref, run = tmp_path / "cache", tmp_path / "ref", tmp_path / "run"
    launch(ref, src_n, src, cache)
    out = launch(run, dst_n, dst, cache, "--resume", str(ref / "checkpoints" / "step_0000004"))
    same = (src_n, src) == (dst_n, dst)
    assert "at step 4" in out and (("resharded from layout" in out) != same), out[-2000:]
    tol = 1e-6 if same else 2e-5
    got, want = rows(run), rows(ref)
    assert sorted(s for s in got if "joint_loss" in got[s]) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert got[step]["joint_loss"] == pytest.approx(want[step]["joint_loss"], abs=tol), step
        assert got[step]["lr"] == pytest.approx(want[step]["lr"], rel=1e-12), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-4), step
    assert got[8]["eval_joint_loss"] == pytest.approx(want[8]["eval_joint_loss"], abs=tol)
    a, b = (
        read_model_state(run / "checkpoints" / "step_0000008"),
        read_model_state(ref / "checkpoints" / "step_0000008"),
    )
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=10 * tol, msg=lambda m, k=k: f"{k}: {m}")
