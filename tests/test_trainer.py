"""The trainer in one process: ZeRO stages and gradient accumulation change nothing but memory; bf16 tracks
fp32 and resumes to the bit."""

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
from runs import assert_fp32_optimizer_state

SMALL = [
    *PARITY,
    "train.steps=4",
    "train.eval_batches=1",
    "optim.warmup_steps=2",
    "optim.grad_clip=0.5",  # small enough to clip: clipping must act on the whole step's gradient
    "tracking.enabled=false",  # numerics only: each tracked run would wait ≈3 s for its MLflow process
]


def run(
    tmp_path: Path, name: str, *overrides: str, resume: Path | None = None
) -> tuple[list[dict], dict[str, torch.Tensor]]:
    cfg = load_config("configs/tiny.yaml", [*SMALL, *overrides])
    validate_config(cfg, world_size=1, cuda_available=False)
    result = train(cfg, tmp_path / name, resume=resume)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    state = read_model_state(result.checkpoint)
    return [r for r in rows if "loss" in r], state


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainer")
    mp = pytest.MonkeyPatch()
    mp.setenv("CPMTP_CACHE_DIR", str(tmp / "cache"))
    mp.chdir(Path(__file__).resolve().parents[1])
    # DeepSpeed's BF16_Optimizer (bf16 at ZeRO-1) reports memory while it is built, each time after a full
    # gc.collect(): ~2 s per engine in a test process, for a print nobody reads here.
    mp.setattr("deepspeed.runtime.bf16_optimizer.see_memory_usage", lambda *args, **kwargs: None)
    out = {
        "one_batch": run(tmp, "one_batch", "train.micro_batch_size=8"),
        "accum": run(tmp, "accum", "train.micro_batch_size=2"),
        "zero1": run(tmp, "zero1", "train.micro_batch_size=4", "optim.zero_stage=1"),
        "zero2": run(tmp, "zero2", "train.micro_batch_size=4", "optim.zero_stage=2"),
        # The GPU path's numerics (bf16 trunk and head, fp32 loss math, DeepSpeed's bf16 optimizers) run on
        # CPU too. ZeRO-0 accumulates in bf16; ZeRO-1 (DeepSpeed's BF16_Optimizer) and 2 in fp32.
        "bf16": run(tmp, "bf16", "train.micro_batch_size=4", "train.precision=bf16"),
    }
    for stage in (1, 2):
        settings = ["train.micro_batch_size=4", "train.precision=bf16", f"optim.zero_stage={stage}"]
        name = f"bf16_zero{stage}"
        out[name] = run(tmp, name, *settings, "checkpoint.every=2")
        step2 = tmp / name / "checkpoints" / "step_0000002"
        out[f"{name}_resumed"] = run(tmp, f"{name}_resumed", *settings, resume=step2)
    out["dir"] = tmp
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
@pytest.mark.parametrize("name", ["bf16", "bf16_zero1", "bf16_zero2"])
def test_bf16_tracks_fp32(runs, name):
    ref_rows, _ = runs["one_batch"]
    rows, state = runs[name]
    assert state["head.phi_w1"].dtype == torch.bfloat16
    for a, b in zip(rows, ref_rows, strict=True):
        assert a["joint_loss"] == pytest.approx(b["joint_loss"], rel=2e-3)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=5e-2)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_resume_is_bit_exact(runs, stage):
    """A bf16 run resumed from its step-2 checkpoint repeats steps 3 and 4 and ends with the same weights,
    fp32 master weights and Adam moments, to the bit: under ZeRO-1 (DeepSpeed's BF16_Optimizer, fp32
    partitions) and ZeRO-2 (its ZeRO optimizer). ZeRO-0 in bf16 is resumed after a SIGKILL in
    tests/test_resume.py."""
    name = f"bf16_zero{stage}"
    (full, _), (resumed, _) = runs[name], runs[f"{name}_resumed"]
    assert [r["step"] for r in resumed] == [3, 4]
    untimed = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert untimed(resumed) == untimed(full[2:])  # losses, gradient norm, lr, accuracies: all equal
    final = [
        read_model_state(runs["dir"] / n / "checkpoints" / "step_0000004", "")
        for n in (name, f"{name}_resumed")
    ]
    assert final[0].keys() == final[1].keys()
    for key, tensor in final[0].items():
        assert torch.equal(final[1][key], tensor), key
    assert_fp32_optimizer_state(final[1])


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
