"""Benchmark of the data path: shard building and the streaming loader against what training consumes.

    python bench/data.py --out bench/results/data_cpu.json --markdown docs/BENCHMARKS.md
    python bench/data.py --quick --out /tmp/data.json          # smoke test

1. Tokenizer: `cpmtp data tokenizer` on the input (default `builtin:stdlib-code`, the tiny config's vocabulary
   of 2048), not timed.
2. Shard building: `cpmtp data shards --seq-len 128` of the same input with 1 worker and with 2 workers
   (fresh output folders); input MB/s (UTF-8 bytes of the documents) and tokens/s, overall and per worker.
3. Loader: `ShardLoader` over the built shards with `--loader-workers` (default 2) worker processes,
   micro-batches of 8 × 129 tokens; tokens/s after a warm-up of `--warmup` batches.
4. Training consumption: `cpmtp train --config configs/tiny.yaml data.path=<shards>` for a few steps (one
   process, `data.num_workers` as the loader); the median of the logged tokens/s after the first row.

The ratio loader tokens/s ÷ training tokens/s must be >= 10: the loader is never the bottleneck.
"""

from __future__ import annotations

import argparse
import json
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

BEGIN, END = "<!-- data:begin -->", "<!-- data:end -->"
TARGET_RATIO = 10.0
SEQ_LEN = 128
MICRO_BATCH = 8


def cli(*args: str, env: dict[str, str]) -> tuple[float, str]:
    """Run `cpmtp ...` in a fresh interpreter; (wall seconds, output). Raises on failure."""
    cmd = [sys.executable, "-m", "launchers.cli", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout + proc.stderr


def input_bytes(inputs: list[str]) -> int:
    from data_pipelines.sources import iter_documents

    return sum(len(d.text.encode("utf-8", errors="surrogatepass")) for d in iter_documents(inputs))


def build_row(
    inputs: list[str],
    tokenizer: Path,
    out: Path,
    workers: int,
    env: dict[str, str],
    nbytes: int,
    shard_mb: float,
    heldout: float,
):
    wall, _ = cli(
        "data", "shards", "--input", *inputs, "--tokenizer", str(tokenizer), "--seq-len", str(SEQ_LEN),
        "--out", str(out), "--workers", str(workers), "--shard-size-mb", str(shard_mb),
        "--heldout-fraction", str(heldout), env=env,
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = sum(
        manifest["splits"][s]["tokens"] + manifest["splits"][s]["dropped_tokens"] for s in ("train", "valid")
    )
    return {
        "workers": workers,
        "wall_s": wall,
        "input_mb": nbytes / 1e6,
        "tokens": tokens,
        "mb_per_s": nbytes / 1e6 / wall,
        "tokens_per_s": tokens / wall,
        "tokens_per_s_per_worker": tokens / wall / workers,
        "train_shards": len(manifest["splits"]["train"]["shards"]),
    }


def loader_row(shards: Path, workers: int, batches: int, warmup: int) -> dict:
    from cpmtp_dist.data.shards import ShardLoader, ShardSet

    loader = ShardLoader(
        [ShardSet.load(shards)],
        [1.0],
        micro_batch_size=MICRO_BATCH,
        global_batch_size=MICRO_BATCH,
        seed=0,
        num_workers=workers,
    )
    for _ in range(warmup):
        loader.next_batch()
    start = time.perf_counter()
    tokens = sum(loader.next_batch().numel() for _ in range(batches))
    wall = time.perf_counter() - start
    return {
        "workers": workers,
        "batches": batches,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
    }


def training_row(shards: Path, workers: int, steps: int, env: dict[str, str], work: Path) -> dict:
    run = work / "train"
    _, output = cli(
        "train", "--config", "configs/tiny.yaml", "--run-dir", str(run), f"data.path={shards}",
        f"data.num_workers={workers}", f"train.steps={steps}", "train.log_every=5", "train.eval_every=0",
        "checkpoint.every=0", "train.eval_batches=1", env=env,
    )  # fmt: skip
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
    return {"steps": steps, "tokens_per_s_all": tps, "tokens_per_s": statistics.median(tps)}


def markdown(result: dict) -> str:
    b1, b2 = result["build"]
    ld, tr = result["loader"], result["training"]
    lines = [
        "## Data path: shard building and loader throughput (CPU)",
        "",
        f"Command: `{result['command']}`; machine: nproc = {result['nproc']}, {result['platform']}.",
        "",
        f"Input: {' '.join(result['inputs'])} ({b1['input_mb']:.1f} MB of text, {b1['tokens']:,} tokens with the "
        f"tiny config's tokenizer of {result['vocab_size']}); `cpmtp data shards --seq-len {SEQ_LEN} "
        f"--shard-size-mb {result['shard_size_mb']:g}`.",
        "",
        "| shard building | wall (s) | MB/s | tokens/s | tokens/s per worker |",
        "|:---|---:|---:|---:|---:|",
    ]
    for b in (b1, b2):
        lines.append(
            f"| {b['workers']} worker(s) | {b['wall_s']:.1f} | {b['mb_per_s']:.2f} | {b['tokens_per_s']:,.0f} | "
            f"{b['tokens_per_s_per_worker']:,.0f} |"
        )
    lines += [
        "",
        "| loader vs training | tokens/s |",
        "|:---|---:|",
        f"| `ShardLoader`, {ld['workers']} workers, micro-batch {MICRO_BATCH} × {SEQ_LEN + 1} | {ld['tokens_per_s']:,.0f} |",
        f"| `cpmtp train` configs/tiny.yaml on these shards (median of logged rows) | {tr['tokens_per_s']:,.0f} |",
        f"| ratio (target ≥ {TARGET_RATIO:g}) | **{result['ratio']:.0f}** ({'PASS' if result['pass'] else 'FAIL'}) |",
        "",
        "Building includes start-up (imports, tokenizer load, pool start) and the checksums; the loader "
        "reads, checks (sha256 before each shard), decodes and shuffles.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON result file")
    p.add_argument("--markdown", type=Path, help="write the table between the data markers of this file")
    p.add_argument("--input", nargs="+", default=["builtin:stdlib-code"], help="corpus to build shards of")
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=400, help="timed loader batches")
    p.add_argument("--warmup", type=int, default=20, help="loader batches before timing")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--shard-size-mb", type=float, default=4.0)
    p.add_argument("--heldout-fraction", type=float, default=0.01)
    p.add_argument("--quick", action="store_true", help="smoke test: a small input, few batches and steps")
    p.add_argument("--work-dir", type=Path, help="keep the built tokenizer, shards and run here")
    args = p.parse_args(argv)
    if args.quick:
        args.input = [str(Path(os.__file__).parent / "email")]
        # A small corpus: small shards, so that every loader worker has some.
        args.batches, args.warmup, args.train_steps, args.shard_size_mb = 30, 5, 6, 0.05
        args.heldout_fraction = 0.2
    command = "python bench/data.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    tmp = tempfile.TemporaryDirectory(prefix="cpmtp_bench_data_") if args.work_dir is None else None
    work = Path(tmp.name) if tmp else args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        vocab = 2048 if not args.quick else 400
        tok = work / "tokenizer"
        cli(
            "data",
            "tokenizer",
            "--input",
            *args.input,
            "--vocab-size",
            str(vocab),
            "--out",
            str(tok),
            env=env,
        )
        nbytes = input_bytes(args.input)
        builds = [
            build_row(
                args.input,
                tok,
                work / f"shards_w{w}",
                w,
                env,
                nbytes,
                args.shard_size_mb,
                args.heldout_fraction,
            )
            for w in (1, 2)
        ]
        print(json.dumps(builds, indent=2), flush=True)
        shards = work / "shards_w2"
        loader = loader_row(shards, args.loader_workers, args.batches, args.warmup)
        print(json.dumps(loader), flush=True)
        training = training_row(shards, args.loader_workers, args.train_steps, env, work)
        ratio = loader["tokens_per_s"] / training["tokens_per_s"]
        result = {
            "command": command,
            "nproc": os.cpu_count(),
            "platform": f"{platform.machine()} {platform.system()}, Python {platform.python_version()}",
            "inputs": args.input,
            "vocab_size": vocab,
            "shard_size_mb": args.shard_size_mb,
            "build": builds,
            "loader": loader,
            "training": training,
            "ratio": ratio,
            "target_ratio": TARGET_RATIO,
            "pass": ratio >= TARGET_RATIO,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        section = markdown(result)
        print(section)
        if args.markdown:
            write_section(args.markdown, BEGIN, END, section)
        return 0
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
