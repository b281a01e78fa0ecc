"""`cpmtp train data.path=...` end to end: shards built by `cpmtp data`, a blend, the loader state in the
checkpoint (resumed at another data.num_workers), and data that does not fit the model failing before training
with its message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cpmtp_dist.config_io import load_config
from cpmtp_dist.data.data_path import ShardError
from cpmtp_dist.data.source import build_training_data
from cpmtp_dist.inference.evaluation import heldout_batches
from cpmtp_dist.training.trainer import train
from data_pipelines.shards import build_shards
from launchers.cli import main as cli_main
from runs import metrics_by_step

ROOT = Path(__file__).resolve().parents[1]
SEQ = 32
MODEL = [
    "model.trunk.num_layers=2",
    "model.trunk.hidden_size=32",
    f"model.trunk.seq_length={SEQ}",
    "model.trunk.vocab_size=512",
    "model.cp.horizon=2",
    "model.cp.rank=2",
    "train.global_batch_size=8",
    "train.micro_batch_size=4",
    "train.log_every=2",
    "train.eval_batches=2",
    "checkpoint.every=0",
]


def cpmtp(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "launchers.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    code = str(Path(json.__file__).parent)  # the json package: a small real code corpus
    res = cpmtp("data", "tokenizer", "--input", code, "builtin:stdlib-prose", "--vocab-size", "400",
                "--out", str(root / "tok"))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    out = {}
    # The prose shards keep the default --shard-size-mb: one train shard, fewer than the loader's 2 readers.
    for name, source, size in (
        ("code", code, ["--shard-size-mb", "0.05"]),
        ("prose", "builtin:stdlib-prose", []),
    ):
        res = cpmtp("data", "shards", "--input", source, "--tokenizer", str(root / "tok"), "--seq-len", str(SEQ),
                    "--out", str(root / name), *size, "--heldout-fraction", "0.2", "--workers", "2")  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = root / name
    return out


@pytest.mark.slow
def test_train_on_a_blend_of_shards(built, tmp_path):
    """Also a dataset of one shard for two loader workers: they share it by sample ranges."""
    prose = json.loads((built["prose"] / "manifest.json").read_text())
    assert len(prose["splits"]["train"]["shards"]) == 1
    run = tmp_path / "run"
    blend = f"data.path=0.7 {built['code']} 0.3 {built['prose']}"
    res = cpmtp(
        "train", "--config", "configs/tiny.yaml", "--run-dir", str(run), *MODEL, "train.steps=4", blend
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert all(r["data_skipped_shards"] == 0 for r in rows if "loss" in r)
    assert rows[-1]["eval_joint_loss"] > 0
    meta = json.loads((run / "checkpoints" / "step_0000004" / "meta.json").read_text())
    state = meta["loader"]
    assert state["kind"] == "shards" and state["batches"] == 8  # 4 steps x 2 micro-batches
    assert [d[0] for d in state["fingerprint"]["datasets"]] == [0.7, 0.3]
    # The checkpoint's tokenizer is the shards' tokenizer.
    card = json.loads((run / "checkpoints" / "step_0000004" / "tokenizer" / "tokenizer.json").read_text())
    manifest = json.loads((built["code"] / "manifest.json").read_text())
    assert card["sha256"] == manifest["tokenizer"]["sha256"]
    # `cpmtp train --resume auto` (in this process) at another data.num_workers (2 -> 0): the readers restart
    # elastically, and the next checkpoint records the data position of every data-parallel rank (here one).
    argv = ["train", "--config", str(ROOT / "configs/tiny.yaml"), "--run-dir", str(run), "--resume", "auto",
            *MODEL, "train.steps=6", blend, "data.num_workers=0", "--tracking-uri", "none"]  # fmt: skip
    assert cli_main(argv) == 0
    assert sorted(metrics_by_step(run)) == [2, 4, 6]
    state = json.loads((run / "checkpoints" / "step_0000006" / "meta.json").read_text())["loader"]
    assert state["batches"] == 4 and state["elastic"]["generation"] == 1
    assert [len(workers) for workers in state["ranks"]] == [1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.trunk.vocab_size=256"], "raise model.trunk.vocab_size to at least 400"),
        (
            ["model.trunk.seq_length=64"],
            "set model.trunk.seq_length=32 or rebuild the shards with --seq-len 64",
        ),
    ],
)
def test_data_that_does_not_fit_the_model_fails_before_training(built, tmp_path, overrides, message):
    run = tmp_path / "run"
    args = [
        "train",
        "--config",
        "configs/tiny.yaml",
        "--run-dir",
        str(run),
        *MODEL,
        f"data.path={built['code']}",
    ]
    res = cpmtp(*args, *overrides)
    assert res.returncode == 2, res.stderr[-3000:]
    assert message in res.stderr and "manifest.json" in res.stderr
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text()


def test_a_layout_the_data_cannot_serve_is_refused_before_the_model_is_built(built, tmp_path):
    """Fewer samples than readers (dp × data.num_workers): `build_training_data`, which `train()` calls before
    it builds the model, refuses in one line (the CLI prints it as `error: ...`)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("def double(x):\n    return 2 * x\n\n" * 8)
    tok = built["code"] / "tokenizer"
    manifest = build_shards(
        [str(corpus)], tok, SEQ, tmp_path / "few", heldout_fraction=0.0, progress_bar=False
    )
    samples = manifest["splits"]["train"]["sequences"]
    assert 2 < samples < 8
    cfg = load_config(ROOT / "configs/tiny.yaml", [*MODEL, f"data.path={tmp_path / 'few'}"])
    cfg.train.micro_batch_size = 1
    for dp_size, workers in ((2, 4), (8, 0)):
        cfg.data.num_workers, cfg.train.global_batch_size = workers, dp_size
        with pytest.raises(ShardError) as err:
            build_training_data(cfg, dp_rank=0, dp_size=dp_size)
        assert str(err.value) == (
            f"{tmp_path / 'few'}: {samples} training samples for 8 readers (data-parallel size × data.num_workers, "
            "0 workers counting as 1): every reader needs a sample; lower data.num_workers, or add data"
        )
    # One reader per sample is served; the held-out split is empty, so training goes on without evaluation.
    cfg.data.num_workers, cfg.train.global_batch_size = 0, samples
    data = build_training_data(cfg, dp_rank=0, dp_size=samples)
    assert data.valid == [] and data.shortfall == (
        f"the valid splits of {tmp_path / 'few'} hold 0 samples, fewer than one micro-batch per data-parallel "
        f"rank ({samples} × 1)"
    )
    cfg = load_config(ROOT / "configs/tiny.yaml", [*MODEL, f"data.path={tmp_path / 'few'}", "train.steps=2",
                      "train.eval_every=1", "train.global_batch_size=2", "train.micro_batch_size=1",
                      "tracking.enabled=false"])  # fmt: skip
    result = train(cfg, tmp_path / "run")
    assert result.final_step == 2 and result.eval_metrics == {} and result.checkpoint.is_dir()
    assert [
        sorted(r) for r in metrics_by_step(tmp_path / "run").values() if any("eval" in k for k in r)
    ] == []
    # `cpmtp eval` of that checkpoint has nothing to evaluate by default, and says what to pass.
    with pytest.raises(
        ValueError, match=r"no held-out micro-batch to evaluate: the valid splits .* pass --data"
    ):
        heldout_batches(result.checkpoint / "config.yaml", data.tokenizer.fingerprint, None, 2)
