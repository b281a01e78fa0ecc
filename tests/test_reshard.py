"""A checkpoint saved at one layout resumes at another: the model, the Adam moments, the step counts and
the learning-rate schedule are resliced, so the resumed steps equal the saving run's own next steps.

Each case resumes the step-4 checkpoint of a layout test's run (`layout_runs.py`: 8 steps, checkpoints at 4
and 8) at the target layout for steps 5..8. The source layouts equal one process to ~1e-6
(`test_parallel_layouts.py`), so the target must match the source's steps 5..8, its held-out loss and
its final weights to that accuracy; a resume that restarted Adam or the schedule would be off by far
more (checked: with the moments left at zero, the losses of steps 6..8 are off by 2e-3 to 7e-3).
"""

from __future__ import annotations

import pytest
import torch

from cpmtp_dist.training.checkpoint import read_model_state
from layout_runs import LAYOUTS, launch
from runs import metrics_by_step as rows

# name: (the layout run that saves, a key of LAYOUTS; processes and layout settings that resume). The resuming
# run keeps the saving run's model settings. Two cases resume a Llama-style trunk (grouped-query attention,
# SwiGLU, untied output layer): the gated MLP's first projection holds each tp rank's slice of both halves,
# resliced both ways; one resumes checkpoints written in the background (checkpoint.async_save).
CASES = {
    "tp2_sp_to_tp1_llama": ("tp2_sp_llama", 1, []),
    "pp2_to_pp1": ("pp2_zero1", 1, ["optim.zero_stage=1"]),
    "ep2_to_ep1_llama": ("ep2_zero1_llama", 1, ["optim.zero_stage=1"]),
    "dp2_zero2_to_tp2_llama": ("dp2_zero2_llama", 2, ["parallel.tp=2"]),
    # Same layout: ZeRO fragments of expert-parallel components go back where they came from, to the bit.
    "ep2_to_ep2_llama": ("ep2_zero1_llama", 2, ["parallel.ep=2", "optim.zero_stage=1"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_resume_at_another_layout(case, tmp_path, layout_runs):
    source, dst_n, dst = CASES[case]
    src_n, src, model = LAYOUTS[source]
    ref, run = layout_runs.layout(source), tmp_path / "run"
    resume = ("--resume", str(ref / "checkpoints" / "step_0000004"))
    out = launch(run, dst_n, dst + model, layout_runs.cache, *resume)
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
