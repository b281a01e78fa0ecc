"""`cpmtp generate`, `cpmtp eval` and `cpmtp bench decode` end to end on a small trained checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest

from launchers.cli import main as cli
from test_train_cli import ROOT, SMALL, cpmtp


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    run = root / "run"
    res = cpmtp(
        "train", "--config", "configs/tiny.yaml", "train.steps=40", *SMALL, "--run-dir", str(run), cache=root
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return run, root


@pytest.mark.slow
def test_generate_greedy_is_the_same_text_both_ways_and_sampling_runs(trained, capsys, monkeypatch):
    run, cache = trained
    monkeypatch.setenv("CPMTP_CACHE_DIR", str(cache))
    common = [
        "generate",
        "--checkpoint",
        str(run / "checkpoints"),
        "--prompt",
        "def main(",
        "--max-new-tokens",
    ]
    # One real process proves the console command; the other calls run `main` in this process (cheaper).
    ar = cpmtp(*common, "40", "--mode", "ar", "--device", "cpu", cache=cache)
    assert ar.returncode == 0, ar.stderr[-2000:]
    assert ar.stdout.startswith("def main(") and "1.00 tokens per forward" in ar.stderr

    def run(*args: str) -> tuple[int, str, str]:
        try:
            rc = cli([*common, *args])
        except SystemExit as exit_:
            rc = exit_.code
        out = capsys.readouterr()
        return rc, out.out, out.err

    assert run("40", "--mode", "speculative")[:2] == (0, ar.stdout)  # --device auto: the CPU here
    assert run("40", "--mode", "tree", "--branches", "3")[:2] == (0, ar.stdout)
    sampled = run("20", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3")
    again = run("20", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3")
    assert sampled[0] == 0 and sampled[1] == again[1]  # seeded
    # A user's mistake: `error: ...` and status 2, as every command reports one.
    rc, _, err = run("8", "--greedy", "--temperature", "0.5")
    assert rc == 2 and err.startswith("error: --greedy takes the argmax"), err
    rc, _, err = run("8", "--top-p", "1.5")
    assert rc == 2 and err.startswith("error: ") and "--top-p 1.5: must be in (0, 1]" in err, err


@pytest.mark.slow
def test_eval_writes_the_metrics_and_logs_them_to_mlflow(trained):
    run, cache = trained
    out = cache / "eval.json"
    res = cpmtp(
        "eval", "--checkpoint", str(run / "checkpoints"), "--out", str(out), "--batches", "2", "--prompts", "2",
        "--new-tokens", "16", cache=cache,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    h = result["heldout"]
    assert result["checkpoint"].endswith("step_0000040")
    assert h["joint_loss"] > h["ntp_loss"] > 0 and h["heldout_sequences"] == 8
    assert len(h["expert_usage"]) == 4 and sum(h["expert_usage"]) == pytest.approx(1, abs=1e-3)
    for kind in ("greedy", "sampling_t1"):
        d = result["decoding"][kind]
        assert 1 <= d["tokens_per_forward"] <= 4 and d["acceptance"][0] == 1.0 and len(d["acceptance"]) == 4
        assert d["new_tokens"] == 32
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`cpmtp.kind` = 'eval'"
    )
    assert len(runs) == 1
    # The artifacts lie beside the store (not in ./mlruns).
    assert runs[0].info.artifact_uri.startswith((run / "mlartifacts").as_uri())
    logged = runs[0].data.metrics
    assert logged["eval_joint_loss"] == pytest.approx(h["joint_loss"])
    assert logged["decode_greedy_tokens_per_forward"] == pytest.approx(
        result["decoding"]["greedy"]["tokens_per_forward"]
    )
    missing = cpmtp("eval", "--checkpoint", str(run / "checkpoints"), "--data", str(cache / "nowhere"),
                    "--out", str(out), cache=cache)  # fmt: skip
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "error: --data" in missing.stderr


def test_status_of_the_finished_run(trained, capsys):
    """`cpmtp status` on the run (tests/test_run_status.py has a running and a dead one)."""
    run, _ = trained
    assert cli(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run}: step 40/40 (100 %)" in out and "alive: no: finished" in out, out
    assert (
        f"newest checkpoint: {run / 'checkpoints' / 'step_0000040'}" in out and "health events: none" in out
    )


@pytest.mark.slow
def test_bench_decode_compares_both_modes_on_the_same_prompts(trained):
    """Through bench/decode.py --quick, which runs `cpmtp bench decode` greedy and sampled."""
    run, cache = trained
    out, md = cache / "bench.json", cache / "BENCH.md"
    res = subprocess.run(
        [sys.executable, "bench/decode.py", "--quick", "--checkpoint", str(run / "checkpoints"), "--out", str(out),
         "--markdown", str(md)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "CPMTP_CACHE_DIR": str(cache)},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "n = 4, r = 4" in result["model"]
    assert list(result["runs"]) == ["greedy", "sampling, T = 1", "tree, k = 4 (greedy)"]
    for name, b in result["runs"].items():
        assert b["prompts"] == 2 and b["sampling"]["greedy"] is (name != "sampling, T = 1")
        assert b["ar_tokens_per_s"] > 0 and b["speculative_tokens_per_s"] > 0
        assert b["speedup"] == pytest.approx(b["speculative_tokens_per_s"] / b["ar_tokens_per_s"])
        assert 1 <= b["tokens_per_forward"] <= 4
        assert (b["device"], b["dtype"]) == ("cpu", "float32")  # train.precision=auto on a CPU
    for name in ("greedy", "tree, k = 4 (greedy)"):
        assert result["runs"][name]["greedy_first_divergence"] == [None, None]  # fp32: identical outputs
    tree = result["runs"]["tree, k = 4 (greedy)"]
    assert (tree["mode"], tree["branches"], len(tree["kept_branch"])) == ("tree", 4, 4)
    assert "| greedy |" in md.read_text() and "speed-up" in res.stdout
