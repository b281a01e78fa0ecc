"""Smoke test of `bench/checkpoint.py --quick`: both save modes and a well-formed result (the resumes are the
resume and reshard tests')."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_checkpoint_benchmark(tmp_path: Path) -> None:
    out, md = tmp_path / "ckpt.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n<!-- data:begin -->\nkept\n<!-- data:end -->\n")
    cmd = [sys.executable, "bench/checkpoint.py", "--quick", "--out", str(out), "--markdown", str(md)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for mode in ("sync", "async"):
        assert len(result[mode]["saves_s"]) == 3 and result[mode]["median_s"] > 0  # steps 2, 4, 6
    assert result["checkpoint_mb"] > 0 and result["parameters_m"] > 0
    assert result["resume_same_s"] is None and result["resume_tp2_s"] is None  # --quick leaves resumes out
    text = md.read_text()
    assert (
        "kept" in text
        and text.count("<!-- checkpoint:begin -->") == 1
        and "bench/checkpoint.py --quick" in text
    )
