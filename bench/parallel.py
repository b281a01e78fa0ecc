"""Benchmark of the parallel layouts: training throughput of `cpmtp train` on configs/tiny.yaml per layout.

    python bench/parallel.py --out bench/results/parallel_cpu.json --markdown docs/BENCHMARKS.md
    python bench/parallel.py --out /tmp/p.json --layouts single,tp2 --steps 60 --overrides model.cp.rank=8
    python bench/parallel.py --quick --out /tmp/parallel.json          # smoke test

Every layout is one launch of `python -m launchers.cli train --config configs/tiny.yaml` (one process), or
of the same under `python -m torch.distributed.run --standalone --nproc-per-node=P` (P processes), with the
layout's settings, `train.steps=--steps`, `train.log_every=--log-every`, `train.eval_every=0` (no held-out
evaluation inside the timed steps), `checkpoint.every=0` (the trainer still saves once after the last
step, outside the timed steps), a fresh run directory, and then `--overrides` (last, so they win).

All launches share one `CPMTP_CACHE_DIR` (`--cache-dir`, else `$CPMTP_CACHE_DIR`, else a folder in the work
directory), warmed first by a 1-step single-process run with the same overrides, so tokenizer training
and tokenisation are never timed (not with `--quick`: its tiny corpus is tokenised in a fraction of a second). `OMP_NUM_THREADS` is nproc // P (at least 1) for a P-process layout.

Throughput: the trainer logs `tokens_per_s` (global tokens per optimizer step times the steps since the
previous log row, over the wall time since then, on rank 0). The first logged row includes warm-up
(start-up of the allocator, DeepSpeed's first step, ...) and is left out; the row reports the median of
the others (`tokens_per_s_all`), its ratio to the single-process median of the same invocation, and the
wall time of the whole launch (imports, process-group set-up, data loading, final evaluation and checkpoint
included). `final_loss` is the loss of the last logged step: every layout trains the same model, so it
should match the single-process run to rounding.

JSON rows (a list, written to --out after every layout):
    layout, processes, settings (the layout's key=value settings), threads_per_process,
    status ("ok" | "failed (rc=N)" | "timed out after S s"),
    tokens_per_s_median, tokens_per_s_all (after the warm-up row), tokens_per_s_first (the warm-up row),
    ratio_to_single, final_loss, final_loss_single, loss_delta_vs_single, wall_s,
    and on failure `error` (the tail of the launch's output). Numbers are null where the layout did not run.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers (report.py)
from report import write_section  # noqa: E402

CONFIG = "configs/tiny.yaml"
BEGIN, END = "<!-- parallel:begin -->", "<!-- parallel:end -->"

# name: (processes, layout settings)
LAYOUTS: dict[str, tuple[int, list[str]]] = {
    "single": (1, []),
    "tp2": (2, ["parallel.tp=2"]),
    "ep2": (2, ["parallel.ep=2", "optim.zero_stage=1"]),
    "dp2_zero1": (2, ["optim.zero_stage=1"]),
    "dp2_zero2": (2, ["optim.zero_stage=2"]),
    "tp2_sp": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pp=2", "optim.zero_stage=1"]),
    "tp2_ep2": (4, ["parallel.tp=2", "parallel.ep=2", "optim.zero_stage=1"]),
    "tp2_pp2": (4, ["parallel.tp=2", "parallel.pp=2", "optim.zero_stage=1"]),
    "dp2_pp2": (4, ["parallel.pp=2", "optim.zero_stage=1"]),
}
FULL = {"steps": 30, "log_every": 5, "layouts": ",".join(LAYOUTS)}
QUICK = {"steps": 3, "log_every": 1, "layouts": "single,dp2_zero1"}


# --------------------------------------------------------------------------------------------------
# helpers


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_per_process(processes: int, nproc: int) -> int:
    """OMP threads per process so that processes x threads = nproc (at least one thread each)."""
    return max(1, nproc // processes)


def launch_command(processes: int, run_dir: Path, overrides: list[str]) -> list[str]:
    args = ["train", "--config", CONFIG, "--run-dir", str(run_dir), *overrides]
    if processes == 1:
        return [sys.executable, "-m", "launchers.cli", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "launchers.cli",
        *args,
    ]


def run_launch(
    processes: int, run_dir: Path, overrides: list[str], *, cache_dir: Path, threads: int, timeout: float
) -> tuple[int | None, float, str]:
    """Runs one launch; returns (exit status or None on timeout, wall seconds, its combined output)."""
    env = {
        **os.environ,
        "CPMTP_CACHE_DIR": str(cache_dir),
        "OMP_NUM_THREADS": str(threads),
        "PYTHONWARNINGS": "ignore",
    }
    cmd = launch_command(processes, run_dir, overrides)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
        rc, output = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as err:
        rc, output = None, err.stdout if isinstance(err.stdout, str) else (err.stdout or b"").decode()
    return rc, time.perf_counter() - t0, output


def read_metrics(run_dir: Path) -> list[dict]:
    """The logged training rows (those with a loss) of a run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r and "tokens_per_s" in r]


def summarise(rows: list[dict]) -> dict:
    """Throughput after the warm-up row and the final loss of a run's training rows."""
    after = [r["tokens_per_s"] for r in rows[1:]]
    return {
        "tokens_per_s_median": statistics.median(after) if after else None,
        "tokens_per_s_all": after,
        "tokens_per_s_first": rows[0]["tokens_per_s"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "final_step": rows[-1]["step"] if rows else None,
    }


def empty_row(layout: str, processes: int, settings: list[str], threads: int, status: str) -> dict:
    return {
        "layout": layout,
        "processes": processes,
        "settings": settings,
        "threads_per_process": threads,
        "status": status,
        "tokens_per_s_median": None,
        "tokens_per_s_all": [],
        "tokens_per_s_first": None,
        "ratio_to_single": None,
        "final_loss": None,
        "final_loss_single": None,
        "loss_delta_vs_single": None,
        "wall_s": None,
    }


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def bench_layout(
    layout: str,
    processes: int,
    settings: list[str],
    *,
    base: list[str],
    user: list[str],
    work: Path,
    cache_dir: Path,
    nproc: int,
    timeout: float,
) -> dict:
    threads = threads_per_process(processes, nproc)
    run_dir = work / "runs" / layout
    rc, wall, output = run_launch(
        processes, run_dir, base + settings + user, cache_dir=cache_dir, threads=threads, timeout=timeout
    )
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "logs" / f"{layout}.log").write_text(output)
    if rc == 0:
        status = "ok"
    elif rc is None:
        status = f"timed out after {timeout:g} s"
    else:
        status = f"failed (rc={rc})"
    row = empty_row(layout, processes, settings, threads, status)
    row["wall_s"] = wall
    if status == "ok":
        row |= summarise(read_metrics(run_dir))
        if row["tokens_per_s_median"] is None:
            row["status"] = (
                "failed (no logged rows after the warm-up row: raise --steps or lower --log-every)"
            )
    else:
        row["error"] = tail(output)
    return row


def add_single_comparison(rows: list[dict]) -> None:
    single = next((r for r in rows if r["layout"] == "single" and r["status"] == "ok"), None)
    if single is None:
        return
    for r in rows:
        r["final_loss_single"] = single["final_loss"]
        if r["status"] != "ok":
            continue
        if single["tokens_per_s_median"]:
            r["ratio_to_single"] = r["tokens_per_s_median"] / single["tokens_per_s_median"]
        if r["final_loss"] is not None and single["final_loss"] is not None:
            r["loss_delta_vs_single"] = r["final_loss"] - single["final_loss"]


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(rows: list[dict], meta: dict) -> str:
    nproc = meta["nproc"]
    lines = [
        "## Parallel layouts: training throughput on CPU (gloo)",
        "",
        f"`cpmtp train` on `{CONFIG}` ({meta['model']}), {meta['steps']} steps, `train.log_every = "
        f"{meta['log_every']}`; tokens/s is the median over the logged rows after the first (which "
        "includes warm-up), ratio = tokens/s / single-process tokens/s of the same invocation; wall = the "
        "whole launch (start-up, data, final evaluation and checkpoint included); final loss = the loss of the "
        "last step, Δ = final loss − single-process final loss (every layout trains the same model).",
        "",
        "| layout | processes × threads | settings | tokens/s (median) | ratio to single | final loss | Δ loss vs single | wall (s) | status |",
        "|:---|:---:|:---|---:|---:|---:|---:|---:|:---|",
    ]
    for r in rows:
        settings = " ".join(f"`{s}`" for s in r["settings"]) or "—"
        oversub = " (oversubscribed)" if r["processes"] * r["threads_per_process"] > nproc else ""
        delta = r["loss_delta_vs_single"]
        lines.append(
            f"| {r['layout']} | {r['processes']} × {r['threads_per_process']}{oversub} | {settings} | "
            f"{fmt(r['tokens_per_s_median'], ',.0f')} | {fmt(r['ratio_to_single'], '.2f')} | "
            f"{fmt(r['final_loss'], '.5f')} | {fmt(delta, '+.1e')} | {fmt(r['wall_s'], '.1f')} | "
            f"{r['status']} |"
        )
    oversubscribed = sorted(r["layout"] for r in rows if r["processes"] * r["threads_per_process"] > nproc)
    lines += [
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: nproc = {nproc}, {meta['platform']}, Python {meta['python']}, torch {meta['torch']}, "
        f"DeepSpeed {meta['deepspeed']}; cpu, fp32, gloo. OMP_NUM_THREADS = nproc // processes (at least 1).",
        "",
        "Notes:",
        f"- On {nproc} CPU cores, parallel layouts are expected to be *slower* than one process: the processes "
        "share the same cores (each gets nproc / processes intra-op threads instead of nproc), and gradients, "
        "tensor-parallel partial sums and expert-parallel gathers travel over gloo through shared memory/TCP. "
        "These numbers measure the overhead of each layout, not a speed-up.",
    ]
    if oversubscribed:
        lines.append(
            f"- {', '.join(oversubscribed)}: more processes than cores (at least one thread each), so the "
            "processes are oversubscribed and time-share the cores."
        )
    lines += [
        "- GPU numbers (MFU of a ~1B-parameter config in bf16 on NCCL) need a GPU and are not measured here.",
    ]
    return "\n".join(lines) + "\n"


def write_markdown(path: Path, section: str) -> None:
    """Put `section` between this benchmark's markers in `path`."""
    write_section(path, BEGIN, END, section)


def model_summary(run_dir: Path) -> str:
    """A one-line description of the trained model from a run's config.yaml."""
    try:
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        t, c, tr = cfg["model"]["trunk"], cfg["model"]["cp"], cfg["train"]
        return (
            f"{t['num_layers']} layers × {t['hidden_size']}, seq {t['seq_length']}, V = {t['vocab_size']}, "
            f"CP n = {c['horizon']}, r = {c['rank']} ({c['parameterisation']}); "
            f"{tr['global_batch_size']} × {t['seq_length']} = {tr['global_batch_size'] * t['seq_length']:,} "
            f"tokens per step, micro-batch {tr['micro_batch_size']}"
        )
    except (OSError, KeyError, TypeError, ImportError):
        return "model: see the config"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------------------------------
def warm_cache(work: Path, base: list[str], args: argparse.Namespace, cache_dir: Path, nproc: int) -> int:
    """The untimed 1-step single-process run that fills the cache (left out by --quick, whose tiny corpus
    takes a fraction of a second to tokenise); its exit status."""
    print("warming the cache (1-step single-process run, not timed) ...", flush=True)
    warm = [*base, "train.steps=1", "train.log_every=1", *args.overrides]
    rc, wall, output = run_launch(
        1, work / "warmup", warm, cache_dir=cache_dir, threads=nproc, timeout=args.timeout
    )
    if rc != 0:
        print(tail(output, 40), file=sys.stderr)
        print(f"error: the warm-up run failed (rc={rc})", file=sys.stderr)
        return rc
    print(f"  warm-up done in {wall:.1f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="JSON file for the rows")
    p.add_argument("--steps", type=int, help=f"training steps per layout (default {FULL['steps']})")
    p.add_argument("--log-every", type=int, help=f"steps per logged row (default {FULL['log_every']})")
    p.add_argument(
        "--layouts",
        help=f"comma-separated layouts (default {FULL['layouts']}); known: {', '.join(LAYOUTS)}",
    )
    p.add_argument("--markdown", type=Path, help="write the table between parallel markers in this file")
    p.add_argument(
        "--overrides", nargs="*", default=[], metavar="key=value", help="settings passed to every launch"
    )
    p.add_argument("--cache-dir", type=Path, help="CPMTP_CACHE_DIR (default: $CPMTP_CACHE_DIR, else fresh)")
    p.add_argument("--work-dir", type=Path, help="keep run directories and logs here (default: a temp dir)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per launch")
    p.add_argument("--quick", action="store_true", help="smoke test: " + json.dumps(QUICK))
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.log_every < 1 or args.steps <= args.log_every:
        p.error("need --steps > --log-every >= 1: the first logged row (warm-up) is not counted")

    known = LAYOUTS
    names = [x.strip() for x in args.layouts.split(",") if x.strip()]
    unknown = [x for x in names if x not in known]
    if unknown:
        p.error(f"unknown layouts {unknown}; known: {', '.join(known)}")
    if "single" not in names:
        print("note: adding the single-process layout: the ratios are relative to it", flush=True)
    names = ["single"] + [x for x in names if x != "single"]

    command = "python bench/parallel.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    nproc = cpu_count()
    base = [
        f"train.steps={args.steps}",
        f"train.log_every={args.log_every}",
        "train.eval_every=0",
        "checkpoint.every=0",
    ]
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cpmtp_bench_parallel_")
        work = Path(tmp.name)
    else:
        work = args.work_dir.resolve()
        if (work / "runs").exists() and any((work / "runs").iterdir()):
            p.error(f"{work / 'runs'} is not empty: pass a fresh --work-dir")
    env_cache = os.environ.get("CPMTP_CACHE_DIR")
    cache_dir = (args.cache_dir or (Path(env_cache) if env_cache else work / "cache")).resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    try:
        print(f"nproc = {nproc}; work dir {work}; cache {cache_dir}", flush=True)
        if not args.quick and warm_cache(work, base, args, cache_dir, nproc) != 0:
            return 1

        rows: list[dict] = []
        for name in names:
            processes, settings = known[name]
            threads = threads_per_process(processes, nproc)
            print(f"{name}: {processes} process(es) × {threads} thread(s) {' '.join(settings)}", flush=True)
            row = bench_layout(
                name,
                processes,
                settings,
                base=base,
                user=args.overrides,
                work=work,
                cache_dir=cache_dir,
                nproc=nproc,
                timeout=args.timeout,
            )
            rows.append(row)
            add_single_comparison(rows)
            tps = row["tokens_per_s_median"]
            print(
                f"  {name}: {row['status']}"
                + (f", {tps:,.0f} tokens/s, final loss {row['final_loss']:.5f}" if tps else "")
                + (f", wall {row['wall_s']:.1f} s" if row["wall_s"] is not None else ""),
                flush=True,
            )
            if row.get("error"):
                print("    " + row["error"].replace("\n", "\n    "), flush=True)
            args.out.write_text(json.dumps(rows, indent=2) + "\n")  # partial results survive a crash

        meta = {
            "nproc": nproc,
            "steps": args.steps,
            "log_every": args.log_every,
            "command": command,
            "platform": f"{platform.machine()} {platform.system()}",
            "python": platform.python_version(),
            "torch": version("torch"),
            "deepspeed": version("deepspeed"),
            "model": model_summary(work / "runs" / "single"),
        }
        section = markdown(rows, meta)
        print()
        print(section)
        if args.markdown:
            write_markdown(args.markdown, section)
        failed = [r["layout"] for r in rows if r["status"] != "ok"]
        return 1 if failed else 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
