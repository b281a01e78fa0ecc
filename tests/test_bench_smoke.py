"""Smoke test of `bench/cp_loss.py`: the quick mode runs and writes well-formed rows and markdown."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "cp_loss.py"
KEYS = {
    "impl",
    "n",
    "r",
    "nr",
    "tokens",
    "vocab",
    "hidden",
    "device",
    "dtype",
    "time_s_median",
    "times_s",
    "peak_mib",
}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_cp_loss", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_rows(tmp_path: Path) -> None:
    out, md = tmp_path / "rows.json", tmp_path / "BENCH.md"
    # A tiny naive budget: n*r=4 (estimated ~0.12 GiB) must be skipped with a reason, n*r=1 must run.
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--quick",
        "--out",
        str(out),
        "--markdown",
        str(md),
        "--max-naive-gib",
        "0.1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())
    assert {row["impl"] for row in rows} == {"naive", "chunked"}
    assert sorted(row["nr"] for row in rows) == [1, 1, 4, 4]
    for row in rows:
        assert KEYS <= row.keys(), row
        assert row["n"] * row["r"] == row["nr"]
        assert (row["device"], row["dtype"]) == ("cpu", "fp32")
        assert "error" not in row, row
        if row.get("skipped"):
            assert row["impl"] == "naive" and "GiB > budget" in row["skipped"]
            assert row["time_s_median"] is None and row["peak_mib"] is None
            continue
        assert row["time_s_median"] > 0 and all(t > 0 for t in row["times_s"])
        assert len(row["times_s"]) == 1  # --quick: one measured run
        assert isinstance(row["peak_mib"], float) and math.isfinite(row["peak_mib"])
    skipped = {(row["impl"], row["nr"]) for row in rows if row.get("skipped")}
    assert skipped == {("naive", 4)}
    # The table went to stdout and, between the markers, to the markdown file.
    assert "| n·r |" in proc.stdout
    text = md.read_text()
    assert text.startswith("# Benchmarks")
    assert "<!-- cp_loss:begin -->" in text and "<!-- cp_loss:end -->" in text
    assert "(b) chunked time ≤ 1.5× naive" in text and ("PASS" in text or "FAIL" in text)


def test_markdown_section_is_replaced_in_place(tmp_path: Path) -> None:
    bench = load_bench()
    path = tmp_path / "B.md"
    bench.write_markdown(path, "first\n")
    path.write_text("intro\n\n" + path.read_text() + "\n## Other\nkept\n")
    bench.write_markdown(path, "second\n")
    text = path.read_text()
    assert "first" not in text and "second" in text
    assert text.startswith("intro\n") and text.endswith("## Other\nkept\n")
    assert text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1


def test_nr_pairs() -> None:
    bench = load_bench()
    for nr in (1, 4, 16, 32, 6, 12, 64):
        n, r = bench.nr_pair(nr)
        assert n * r == nr and n >= 1 and r >= 1
    assert [bench.nr_pair(nr) for nr in (1, 4, 16, 32)] == [(1, 1), (2, 2), (4, 4), (4, 8)]
    assert bench.naive_estimate_gib(2048, 16, 32000) > 12 > bench.naive_estimate_gib(2048, 4, 32000)


def test_requires_out() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "--out" in proc.stderr


def test_scaling_cases_and_table_in_process(tmp_path: Path) -> None:
    """--scaling's cases (every parameterisation) and its table, at tiny sizes in this process (the subprocess
    per case is covered by the quick run above)."""
    import argparse

    bench = load_bench()
    args = argparse.Namespace(
        tokens=64, vocab=96, hidden=16, repeats=1, device="cpu", dtype="fp32", chunk_tokens=32, threads=0
    )
    rows = []
    for kind in bench.KINDS:
        for nr in (1, 4):
            args.case = f"chunked:{nr}:{kind}"
            rows.append(bench.run_case(args))
    assert [(row["kind"], row["nr"]) for row in rows] == [(k, nr) for k in bench.KINDS for nr in (1, 4)]
    for row in rows:
        assert row["cpu_s_median"] > 0 and row["param_mib"] > 0 and row["chunk_tokens"] == 32
    # `separate` trains r·n unembeddings of V × d (and no shared one): 4 × 96 × 16 fp32 at n·r = 4.
    sep4 = next(row for row in rows if row["kind"] == "separate" and row["nr"] == 4)
    assert sep4["param_mib"] * bench.MIB == 4 * 96 * 16 * 4 + (16 * 2 + 2) * 4  # + the gate
    args.nr, args.out = "1,4", tmp_path / "rows.json"
    text = bench.scaling_markdown(rows, args, "python bench/cp_loss.py --scaling")
    assert text.count("| separate |") == 2 and "time per factor at n·r=4 ≤ 1.15× n·r=1" in text
    assert "separate: peak above parameters at n·r=4" in text
    md = tmp_path / "B.md"
    bench.write_markdown(md, "table\n", scaling=True)
    assert bench.SCALE_BEGIN in md.read_text() and bench.BEGIN not in md.read_text()
