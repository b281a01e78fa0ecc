"""`cpmtp train` / `cpmtp generate` end to end, in subprocesses, on the built-in corpus."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "model.trunk.num_layers=2",
    "model.trunk.hidden_size=64",
    "model.trunk.seq_length=64",
    "model.trunk.vocab_size=512",
    "data.tokenizer_vocab_size=512",
    "data.max_chars=600000",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.log_every=10",
    "train.eval_every=0",
    "train.eval_batches=2",
    "optim.warmup_steps=5",
    "optim.lr=3e-3",
    "checkpoint.every=20",
    "checkpoint.keep_last=5",
]


def cpmtp(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CPMTP_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "launchers.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_the_run_dir(tmp_path):
    run = tmp_path / "run"
    # Overrides before and after options (argparse alone would refuse the second run of them).
    res = cpmtp(
        "train",
        "train.steps=60",
        "--config",
        "configs/tiny.yaml",
        *SMALL,
        "--run-dir",
        str(run),
        cache=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step     10/60" in res.stdout and ", eta " in res.stdout  # a progress line per logged step

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 60 and resolved["model"]["cp"]["rank"] == 4
    assert resolved["model"]["trunk"]["hidden_size"] == 64  # from SMALL, after --config

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40, 50, 60]
    required = {
        "step",
        "loss",
        "joint_loss",
        "ntp_loss",
        "aux_loss",
        "expert_usage_entropy",
        "grad_norm",
        "lr",
    }
    required |= {"tokens_per_s", "expert_usage"} | {f"acc_head_{s}" for s in range(1, 5)}
    for r in train_rows:
        assert required <= r.keys(), required - r.keys()
        assert r["grad_norm"] is not None and r["grad_norm"] > 0
        assert 0 <= r["expert_usage_entropy"] <= math.log(4) + 1e-6
    first, last = train_rows[0], train_rows[-1]
    # At init every factor is close to uniform: the joint loss is about n log V = 25 nats.
    assert last["joint_loss"] < first["joint_loss"] - 0.5, (first["joint_loss"], last["joint_loss"])
    assert last["joint_loss"] < 0.85 * 4 * math.log(512)
    assert last["ntp_loss"] < min(first["ntp_loss"], 0.85 * math.log(512))
    # The joint loss over n = 4 tokens exceeds the next-token loss, and every head beats chance.
    assert last["joint_loss"] > last["ntp_loss"]
    assert all(last[f"head_loss_{s}"] < math.log(512) for s in range(1, 5))
    evals = [r for r in rows if "eval_joint_loss" in r]
    assert len(evals) == 1 and evals[0]["eval_joint_loss"] < first["joint_loss"]

    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_0000060"
    for name in ("step_0000020", "step_0000040", "step_0000060"):
        assert {"state", "meta.json", "config.yaml", "tokenizer", "rng"} <= {
            p.name for p in (ckpts / name).iterdir()
        }
    meta = json.loads((ckpts / "step_0000060" / "meta.json").read_text())
    assert meta["step"] == 60 and meta["tokens_seen"] == 60 * 8 * 64

    gen = cpmtp(
        "generate", "--checkpoint", str(ckpts), "--prompt", "def ", "--max-new-tokens", "8", cache=tmp_path
    )
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("def ") and "tokens per forward" in gen.stderr


def test_a_bad_config_lists_every_problem_before_any_work(tmp_path):
    res = cpmtp(
        "train",
        "--config",
        "configs/tiny.yaml",
        "--run-dir",
        str(tmp_path / "run"),
        "model.cp.rank=0",
        "optim.lr=-1",
        "train.global_batch_size=12",
        cache=tmp_path,
    )
    assert res.returncode == 2
    for setting in ("model.cp.rank", "optim.lr", "train.global_batch_size"):
        assert setting in res.stderr, res.stderr
    assert not (tmp_path / "run").exists()  # nothing built, nothing written


def test_an_unknown_setting_names_the_key_and_suggests(tmp_path):
    res = cpmtp("train", "--config", "configs/tiny.yaml", "model.cp.rnak=2", cache=tmp_path)
    assert res.returncode == 2
    assert "rnak" in res.stderr and "rank" in res.stderr


def test_an_invalid_layout_fails_before_any_process_group(tmp_path):
    # As torchrun would launch rank 0 of 3 processes; no peer exists, so reaching init_process_group
    # would hang instead of failing: the layout must be refused first.
    env = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "launchers.cli",
            "train",
            "--config",
            "configs/tiny.yaml",
            "parallel.tp=2",
            "parallel.ep=2",
            "optim.zero_stage=0",
        ],
        cwd=ROOT,
        env={**os.environ, **env, "CPMTP_CACHE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "world_size=3 is not divisible by parallel.tp * parallel.pp" in res.stderr
    assert "parallel.ep=2 needs optim.zero_stage >= 1" in res.stderr
