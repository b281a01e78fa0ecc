"""The trainer in one process: ZeRO stages and gradient accumulation change nothing but memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpmtp_dist.config_io import load_config, validate_config
from cpmtp_dist.training.checkpoint import read_model_state
from cpmtp_dist.training.optim import lr_multiplier
from cpmtp_dist.training.trainer import train
from parity_config import PARITY

SMALL = [
    *PARITY,
    "train.steps=4",
    "train.eval_batches=1",
    "optim.warmup_steps=2",
    "optim.grad_clip=0.5",  # small enough to clip: clipping must act on the whole step's gradient
    "tracking.enabled=false",  # numerics only: each tracked run would wait ≈3 s for its MLflow process
]


def run(tmp_path: Path, name: str, *overrides: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    cfg = load_config("configs/tiny.yaml", [*SMALL, *overrides])
    validate_config(cfg, world_size=1, cuda_available=True)  # bf16 runs on CPU here, only slowly
    result = train(cfg, tmp_path / name)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    state = read_model_state(result.checkpoint)
    return [r for r in rows if "loss" in r], state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    mp = pytest.MonkeyPatch()
    mp.setenv("CPMTP_CACHE_DIR", str(tmp / "cache"))
    mp.chdir(Path(__file__).resolve().parents[1])
    out = {
        "one_batch": run(tmp, "one_batch", "train.micro_batch_size=8"),
        "accum": run(tmp, "accum", "train.micro_batch_size=2"),
        "zero1": run(tmp, "zero1", "train.micro_batch_size=4", "optim.zero_stage=1"),
        "zero2": run(tmp, "zero2", "train.micro_batch_size=4", "optim.zero_stage=2"),
        # The GPU path's numerics (bf16 trunk and head, fp32 loss math, DeepSpeed's bf16 optimizer) run on
        # CPU too; the CLI refuses bf16 without CUDA only because it is slow there.
        "bf16": run(tmp, "bf16", "train.micro_batch_size=4", "train.precision=bf16"),
    }
    mp.undo()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("other", ["accum", "zero1", "zero2"])
def test_same_losses_and_weights_as_one_big_batch(runs, other):
    ref_rows, ref_state = runs["one_batch"]
    rows, state = runs[other]
    assert len(rows) == len(ref_rows) == 4
    for a, b in zip(rows, ref_rows, strict=True):
        for key in ("loss", "joint_loss", "ntp_loss", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, a["step"])
        # The norm of the step's gradient catches any mis-scaling of accumulated or sharded gradients,
        # which Adam's scale invariance would hide in the weights.
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert ref_rows[-1]["loss"] != ref_rows[0]["loss"]  # the weights moved
    for k, v in ref_state.items():
        if torch.is_tensor(v) and v.is_floating_point():
            torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
def test_bf16_tracks_fp32(runs):
    ref_rows, _ = runs["one_batch"]
    rows, state = runs["bf16"]
    assert state["head.phi_w1"].dtype == torch.bfloat16
    for a, b in zip(rows, ref_rows, strict=True):
        assert a["joint_loss"] == pytest.approx(b["joint_loss"], rel=2e-3)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-2)


@pytest.mark.slow
def test_clipping_is_active(runs):
    rows, _ = runs["one_batch"]
    assert max(r["grad_norm"] for r in rows) > 0.5  # so the equality above covers clipped steps


def test_warmup_then_cosine_schedule():
    cfg = load_config(None, ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=4"]).optim
    lrs = [lr_multiplier(s, cfg, total_steps=14) for s in range(15)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.55) and lrs[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
