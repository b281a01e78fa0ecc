"""`cpmtp plan`: its parameter counts against the model built on the meta device, the ZeRO arithmetic, its
FLOPs against `flops_per_token`, its estimate against the measured peak of a one-process run, and the command
line (layouts of configs/llama_8b.yaml on one and two 8-GPU nodes, bad input). The multi-process layouts are
checked with `plan_check.assert_plan_matches` on the runs of the layout tests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cpmtp_dist.config_io import load_config, validate_config
from cpmtp_dist.flops import flops_per_token
from cpmtp_dist.plan import (
    GIB,
    candidate_layouts,
    estimate,
    one_line,
    optimizer_bytes,
    params_per_rank,
    step_flops_per_rank,
)
from launchers.cli import main
from parity_config import PARITY
from plan_check import assert_plan_matches

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ["model.trunk.num_query_groups=2", "model.trunk.mlp=swiglu", "model.trunk.untie_embeddings=true"]


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("llama_8b.yaml", []),
        ("llama_1b.yaml", []),
        ("tiny.yaml", ["model.cp.parameterisation=separate"]),
        ("tiny.yaml", ["model.cp.phi=linear", *LLAMA]),
    ],
)
def test_parameters_per_rank_add_up_to_the_model(name, overrides):
    from cpmtp_dist.model.cp_model import CPModel
    from cpmtp_dist.parallel.state import initialize_parallel

    cfg = load_config(ROOT / "configs" / name, overrides)
    initialize_parallel(1, 1, 1, seed=0)
    with torch.device("meta"):
        model = CPModel(cfg.model)
    trunk = sum(p.numel() for p in model.trunk.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert params_per_rank(cfg, 1, 1, 1, 0) == (trunk, head)
    t, c = cfg.model.trunk, cfg.model.cp
    d, v, tied = t.hidden_size, t.vocab_size, not t.untie_embeddings
    # Pipeline stages: the layers and ends are shared out; a tied unembedding gets its copy on the last stage.
    stages = [params_per_rank(cfg, 1, 2, 1, k) for k in range(2)]
    assert sum(s[0] for s in stages) == trunk + (v * d if tied else 0)
    assert [s[1] for s in stages] == [0, head]
    # Tensor parallelism splits everything but the norms (2 per layer and the final one) and the replicated
    # parts of the head (the gate, and the φ maps of a `shared` head).
    norms = (2 * t.num_layers + 1) * d
    tp_trunk, tp_head = params_per_rank(cfg, 2, 1, 1, 0)
    assert 2 * tp_trunk - norms == trunk
    gate = c.rank * d + c.rank
    assert 2 * tp_head - (head if c.parameterisation == "shared" else gate) == head
    # Expert parallelism shares out the components, never the gate.
    ep_head = params_per_rank(cfg, 1, 1, 2, 0)[1]
    assert 2 * (ep_head - gate) == head - gate


def test_zero_stages_shard_optimizer_state_and_gradients():
    cfg = load_config(
        ROOT / "configs/tiny.yaml", ["optim.reduce_bucket_size=1000", "optim.overlap_comm=false"]
    )
    p = 1000.0
    for bf16, e in ((False, 4), (True, 2)):
        cfg.optim.zero_stage = 0
        assert optimizer_bytes(cfg, p, 4, bf16, False) == (e * p, 8 * p + (4 * p if bf16 else 0), 0)
    cfg.optim.zero_stage = 1
    assert optimizer_bytes(cfg, p, 4, False, False) == (
        4 * p,
        12 * p / 4,
        4000,
    )  # fp32 master + m + v over dp
    # bf16 at ZeRO-1 is DeepSpeed's BF16_Optimizer: an fp32 gradient accumulator beside the bf16 .grad.
    assert optimizer_bytes(cfg, p, 4, True, False) == (2 * p + 4 * p, 12 * p / 4, 0)
    # Under pp: DeepSpeed's ZeRO optimizer, with bf16 buckets.
    assert optimizer_bytes(cfg, p, 4, True, True) == (2 * p, 12 * p / 4, 2000)
    cfg.optim.zero_stage = 2
    assert optimizer_bytes(cfg, p, 4, True, False) == (4 * p / 4, 12 * p / 4, 2000)
    cfg.optim.overlap_comm = True  # a second bucket
    assert optimizer_bytes(cfg, p, 4, False, False)[2] == 8000


def test_step_flops_are_flops_per_token():
    cfg = load_config(ROOT / "configs/llama_8b.yaml")
    tokens = cfg.train.global_batch_size * cfg.model.trunk.seq_length
    model = flops_per_token(cfg.model).model
    for tp, world in ((1, 8), (2, 8), (8, 16)):
        cfg.parallel.tp = tp
        assert step_flops_per_rank(cfg, world) == pytest.approx(model * tokens / world, rel=1e-12)
    # A pipeline's last stage also runs the CP head: it is the busiest rank.
    cfg.parallel.tp, cfg.parallel.pp = 1, 2
    assert step_flops_per_rank(cfg, 8) > model * tokens / 8


def test_estimate_matches_the_measured_peak_of_a_run(tmp_path, monkeypatch, capsys):
    from cpmtp_dist.training.trainer import train

    monkeypatch.setenv("CPMTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    settings = [*PARITY, *LLAMA, "train.steps=2", "train.micro_batch_size=4", "train.eval_batches=1"]
    settings += ["tracking.enabled=false", "train.measure_memory=true"]
    cfg = load_config("configs/tiny.yaml", settings)
    validate_config(cfg, world_size=1, cuda_available=False)
    train(cfg, tmp_path / "run")
    predicted, measured = assert_plan_matches(tmp_path / "run", 1)
    printed = [x for x in capsys.readouterr().out.splitlines() if x.startswith("plan: ")]
    assert printed == [one_line(estimate(cfg, 1, cuda=False))]  # before the first step, by rank 0
    assert predicted == estimate(cfg, 1, cuda=False).total
    assert measured > 0


def plan(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["plan", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("nodes", [1, 2])
def test_plan_lists_the_fitting_layouts_ranked(capsys, nodes):
    status, out, err = plan(
        capsys, "--config", "configs/llama_8b.yaml", "--nodes", str(nodes), "--gpus-per-node", "8"
    )
    assert status == 0, err
    assert "model FLOPs per token" in out and "trunk" in out and "CP head" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+\d+\s+\d+\s+\d+\s+\d+\s+\d+\s", line)]
    assert rows and [int(r[0]) for r in rows] == list(range(1, len(rows) + 1))
    memory, flops = [float(r[-2]) for r in rows], [float(r[-1]) for r in rows]
    assert max(memory) <= 80 and flops == sorted(flops)
    assert all(int(r[1]) * int(r[2]) * int(r[4]) == 8 * nodes for r in rows)  # tp * pp * dp = world
    assert re.search(r"plan: [\d.]+ GiB/rank \(params [\d.]+, .*cp loss [\d.]+\) of 80 GiB", out)
    cfg = load_config(ROOT / "configs/llama_8b.yaml")
    every = candidate_layouts(cfg, nodes, 8, 80)
    assert [c.fits for c in every] == sorted((c.fits for c in every), reverse=True)
    assert all(c.memory.total <= 80 * GIB for c in every if c.fits)
    assert estimate(cfg, 8 * nodes).total < 80 * GIB  # the shipped layout fits by the plan


def test_plan_refuses_bad_input_with_the_reason(capsys, tmp_path):
    status, _, err = plan(
        capsys, "--config", str(tmp_path / "nope.yaml"), "--nodes", "1", "--gpus-per-node", "8"
    )
    assert status == 2 and "cannot read config file" in err
    status, out, err = plan(
        capsys, "--config", "configs/llama_8b.yaml", "--nodes", "1", "--gpus-per-node", "3"
    )
    assert status == 2 and "not divisible by parallel.tp * parallel.pp" in err and "--gpus-per-node 3" in err
    assert "layouts that fit" in out  # what would fit 3 GPUs is still listed
    status, _, err = plan(capsys, "--config", "configs/llama_8b.yaml", "--nodes", "0", "--gpus-per-node", "8")
    assert status == 2 and "--nodes 0" in err
    status, _, err = plan(
        capsys, "--config", "configs/tiny.yaml", "--nodes", "1", "--gpus-per-node", "2", "model.cp.rnk=2"
    )
    assert status == 2 and "model.cp.rank" in err


def test_submit_prints_the_estimate_and_warns(capsys):
    from launchers.submit import print_estimate

    cfg = load_config(ROOT / "configs/llama_8b.yaml")
    print_estimate(cfg, 8, gpus=True, gpu_memory_gib=40)
    out = capsys.readouterr().out
    assert out.startswith("plan: ") and "of 40 GiB" in out and "warning: the estimate" in out
    print_estimate(cfg, 8, gpus=True, gpu_memory_gib=141)
    assert "warning" not in capsys.readouterr().out


def test_measure_memory_is_a_checked_setting():
    from cpmtp_dist.config_io import ConfigError

    assert (
        load_config(ROOT / "configs/tiny.yaml").train.measure_memory is False
    )  # off: it slows every operator
    with pytest.raises(ConfigError, match="train.measure_memory"):
        load_config(ROOT / "configs/tiny.yaml", ["train.measure_memory=often"])
