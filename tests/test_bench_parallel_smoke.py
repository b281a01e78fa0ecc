"""Smoke test of `bench/parallel.py`: the quick mode launches single and dp2_zero1 and writes well-formed rows."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "parallel.py"
KEYS = {
    "layout",
    "processes",
    "settings",
    "tokens_per_s_median",
    "tokens_per_s_all",
    "ratio_to_single",
    "final_loss",
    "wall_s",
    "threads_per_process",
    "status",
}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_parallel", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_benchmark_rows(tmp_path: Path) -> None:
    out, md = tmp_path / "tmp.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n<!-- cp_loss:begin -->\nkept\n<!-- cp_loss:end -->\n")
    cache = os.environ.get("CPMTP_CACHE_DIR", str(tmp_path / "cache"))
    env = {**os.environ, "CPMTP_CACHE_DIR": cache}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--markdown", str(md)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {row["layout"]: row for row in json.loads(out.read_text())}
    assert list(rows) == ["single", "dp2_zero1"]
    for row in rows.values():
        assert KEYS <= row.keys(), row
    nproc = load_bench().cpu_count()
    for name, processes in (("single", 1), ("dp2_zero1", 2)):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["processes"] == processes
        assert row["threads_per_process"] == max(1, nproc // processes)
        assert len(row["tokens_per_s_all"]) == 2  # 3 steps logged every step, the first left out
        assert row["tokens_per_s_median"] > 0 and all(t > 0 for t in row["tokens_per_s_all"])
        assert row["wall_s"] > 0 and math.isfinite(row["final_loss"])
    assert rows["dp2_zero1"]["settings"] == ["optim.zero_stage=1"]
    assert rows["single"]["ratio_to_single"] == 1.0
    assert rows["dp2_zero1"]["ratio_to_single"] > 0
    # The layouts train the same model: the final losses agree to rounding.
    assert abs(rows["dp2_zero1"]["final_loss"] - rows["single"]["final_loss"]) <= 1e-4
    assert "| layout |" in proc.stdout
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\n<!-- cp_loss:begin -->\nkept\n<!-- cp_loss:end -->\n")
    assert text.count("<!-- parallel:begin -->") == 1 and text.count("<!-- parallel:end -->") == 1
    assert "| dp2_zero1 |" in text and "python bench/parallel.py --quick" in text


def test_threads_per_process() -> None:
    bench = load_bench()
    assert [bench.threads_per_process(p, 2) for p in (1, 2, 4)] == [2, 1, 1]
    assert [bench.threads_per_process(p, 16) for p in (1, 2, 4)] == [16, 8, 4]


def test_summary_leaves_out_the_warm_up_row() -> None:
    bench = load_bench()
    rows = [{"step": s, "loss": 5.0 - s, "tokens_per_s": t} for s, t in ((1, 10.0), (2, 300.0), (3, 100.0))]
    got = bench.summarise(rows)
    assert got["tokens_per_s_all"] == [300.0, 100.0] and got["tokens_per_s_first"] == 10.0
    assert got["tokens_per_s_median"] == 200.0 and got["final_loss"] == 2.0
