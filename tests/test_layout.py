"""The torch-free layout: dp, expert dp and accumulation derived once; validation imports no training code."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cpmtp_dist.config import Config
from cpmtp_dist.layout import Layout


def test_layout_derives_dp_expert_dp_and_accumulation() -> None:
    cfg = Config()
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep = 2, 2, 2
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 32, 2
    layout = Layout.of(cfg, world_size=16)
    assert (layout.tp, layout.pp, layout.ep, layout.model_parallel) == (2, 2, 2, 4)
    assert (layout.dp, layout.expert_dp, layout.grad_accum) == (4, 2, 4)
    assert layout.fits and layout.problems() == []
    assert Layout(world_size=1, global_batch_size=8, micro_batch_size=8).grad_accum == 1


def test_layout_that_does_not_fit_says_why() -> None:
    odd_world = Layout(world_size=6, tp=4, global_batch_size=8, micro_batch_size=1)
    assert not odd_world.fits
    assert odd_world.problems() == [
        "world_size=6 is not divisible by parallel.tp * parallel.pp = 4 * 1 = 4: launch a multiple of 4 "
        "processes or change parallel.tp / parallel.pp"
    ]
    with pytest.raises(ValueError, match="world_size=6 is not divisible"):
        _ = odd_world.dp
    both = Layout(world_size=6, ep=4, global_batch_size=8, micro_batch_size=1)
    assert [p.split(" ")[0] for p in both.problems()] == ["parallel.ep=4", "train.global_batch_size=8"]
    with pytest.raises(ValueError, match="parallel.ep=4 does not divide the data-parallel size dp = 6"):
        _ = both.expert_dp
    with pytest.raises(ValueError, match="train.micro_batch_size \\* dp = 1 \\* 6 = 6"):
        _ = both.grad_accum
    # Unknown values (a setting of the wrong type) leave their checks out.
    assert Layout(world_size=6, ep=None).problems() == []


def test_config_io_imports_neither_torch_nor_training_code() -> None:
    code = (
        "import sys, cpmtp_dist.config_io as c\n"
        "c.validate_config(c.Config(), world_size=2)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('cpmtp_dist.training')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
