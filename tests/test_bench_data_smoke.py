"""Smoke test of `bench/data.py --quick`: it builds, reads and trains, and writes a well-formed result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_data_benchmark(tmp_path: Path) -> None:
    out, md = tmp_path / "data.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n<!-- parallel:begin -->\nkept\n<!-- parallel:end -->\n")
    cmd = [sys.executable, "bench/data.py", "--quick", "--out", str(out), "--markdown", str(md)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [b["workers"] for b in result["build"]] == [1, 2]
    for b in result["build"]:
        assert b["tokens"] > 0 and b["mb_per_s"] > 0 and b["tokens_per_s_per_worker"] > 0
    assert result["build"][0]["tokens"] == result["build"][1]["tokens"]  # same data whatever the workers
    assert result["loader"]["tokens"] == 30 * 8 * 129 and result["loader"]["tokens_per_s"] > 0
    assert len(result["training"]["tokens_per_s_all"]) >= 1
    assert result["ratio"] == pytest.approx(
        result["loader"]["tokens_per_s"] / result["training"]["tokens_per_s"]
    )
    text = md.read_text()
    assert "kept" in text and text.count("<!-- data:begin -->") == 1 and "bench/data.py --quick" in text
