"""Benchmark of checkpointing: how long training stops for a save, synchronous vs `checkpoint.async_save`,
the size on disk, and how long a resume takes, at the saving layout and resharded.

    python bench/checkpoint.py --out bench/results/checkpoint_cpu.json --markdown docs/BENCHMARKS.md
    python bench/checkpoint.py --quick --out /tmp/checkpoint.json          # smoke test

1. `cpmtp train` of one model (default: the tiny config widened to ~30 M parameters) for `--steps` steps
   with a checkpoint every 2 steps, once with synchronous saves and once with `checkpoint.async_save=true`,
   in one process; the trainer prints the seconds each save held training up (for a background save:
   waiting for the previous one, assembling the state, forking the writer). Median over the saves.
2. The size of one checkpoint folder (weights + Adam moments + generator states + tokenizer).
3. Resume: the same config from the synchronous run's last checkpoint, once in one process (same
   layout) and once under `--nproc-per-node 2` with `parallel.tp=2` (resharded); the trainer prints the
   seconds the restore took.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers (report.py)
from report import write_section  # noqa: E402

BEGIN, END = "<!-- checkpoint:begin -->", "<!-- checkpoint:end -->"
MODEL = [
    "model.trunk.hidden_size=512",
    "model.trunk.num_layers=8",
    "model.trunk.num_attention_heads=8",
    "train.global_batch_size=4",
    "train.micro_batch_size=4",
]
QUICK_MODEL = [
    "model.trunk.hidden_size=64",
    "model.trunk.num_layers=2",
    "train.global_batch_size=4",
    "train.micro_batch_size=4",
]
SAVE = re.compile(r"checkpoint (step_\d+): ([\d.]+) s")
RESUME = re.compile(r"resumed from .* at step (\d+).*\(([\d.]+) s\)")


def train(run: Path, overrides: list[str], env: dict[str, str], nproc: int = 1, *extra: str) -> str:
    launcher = [sys.executable, "-m", "launchers.cli"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    "-m", "launchers.cli"]  # fmt: skip
    cmd = [*launcher, "train", "--config", "configs/tiny.yaml", *overrides, "--run-dir", str(run), *extra]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return res.stdout


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _seconds(value: float | None) -> str:
    return "not measured (--quick)" if value is None else f"{value:.2f}"


def markdown(result: dict) -> str:
    s, a = result["sync"], result["async"]
    lines = [
        "## Checkpoints: save stall, size, resume (CPU)",
        "",
        f"Command: `{result['command']}`; machine: nproc = {result['nproc']}, {result['platform']}.",
        "",
        f"Model: configs/tiny.yaml with `{' '.join(result['model'])}` ({result['parameters_m']:.1f} M "
        f"parameters); a checkpoint is {result['checkpoint_mb']:.0f} MB (weights and both Adam moments in "
        "fp32, generator states, tokenizer).",
        "",
        "| | seconds training stops per save (median) | saves |",
        "|:---|---:|---:|",
        f"| synchronous | {s['median_s']:.2f} | {len(s['saves_s'])} |",
        f"| `checkpoint.async_save=true` | {a['median_s']:.2f} | {len(a['saves_s'])} |",
        f"| ratio async / sync | **{result['async_over_sync']:.2f}** | |",
        "",
        "| resume from the last checkpoint | seconds to restore |",
        "|:---|---:|",
        f"| same layout, 1 process | {_seconds(result['resume_same_s'])} |",
        f"| resharded to tp = 2 (2 processes, rank 0) | {_seconds(result['resume_tp2_s'])} |",
        "",
        "The asynchronous save still assembles the Adam moments over the data-parallel group and forks the "
        "writer while training waits; the file writing overlaps the next steps.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON result file")
    p.add_argument(
        "--markdown", type=Path, help="write the table between the checkpoint markers of this file"
    )
    p.add_argument("--steps", type=int, default=10, help="training steps (a checkpoint every 2)")
    p.add_argument("--quick", action="store_true", help="smoke test: a small model, few steps, no resume")
    args = p.parse_args(argv)
    model = QUICK_MODEL if args.quick else MODEL
    steps = 6 if args.quick else args.steps
    command = "python bench/checkpoint.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    base = [*model, f"train.steps={steps}", "checkpoint.every=2", "train.log_every=1",
            "train.eval_every=0", "train.eval_batches=1", "tracking.enabled=false"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="cpmtp_bench_ckpt_") as tmp:
        work = Path(tmp)
        result: dict = {"command": command, "nproc": os.cpu_count(), "platform": platform.platform()}
        result["model"] = model
        for mode, extra in (("sync", []), ("async", ["checkpoint.async_save=true"])):
            out = train(work / mode, [*base, *extra], env)
            saves = [float(t) for _, t in SAVE.findall(out)]
            result[mode] = {"saves_s": saves, "median_s": statistics.median(saves)}
            if mode == "sync":
                m = re.search(r"model: ([\d.]+)M parameters", out)
                result["parameters_m"] = float(m.group(1)) if m else float("nan")
        result["async_over_sync"] = result["async"]["median_s"] / result["sync"]["median_s"]
        last = work / "sync" / "checkpoints" / f"step_{steps:07d}"
        result["checkpoint_mb"] = folder_mb(last)
        resume = [*model, f"train.steps={steps + 1}", "checkpoint.every=0", "train.log_every=1", "train.eval_every=0",
                  "train.eval_batches=1", "tracking.enabled=false"]  # fmt: skip
        result["resume_same_s"] = result["resume_tp2_s"] = (
            None  # --quick: tests/test_resume.py, test_reshard.py
        )
        if not args.quick:
            out = train(work / "r1", resume, env, 1, "--resume", str(last))
            result["resume_same_s"] = float(RESUME.search(out).group(2))
            out = train(work / "r2", [*resume, "parallel.tp=2"], env, 2, "--resume", str(last))
            result["resume_tp2_s"] = float(RESUME.search(out).group(2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    section = markdown(result)
    print(section)
    if args.markdown:
        write_section(args.markdown, BEGIN, END, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
