"""Benchmark of decoding: autoregressive vs self-speculative, the same model and prompts, batch 1, KV cache.

    python bench/decode.py --out bench/results/decode_cpu.json --markdown docs/BENCHMARKS.md
    python bench/decode.py --quick --checkpoint RUN/checkpoints --out /tmp/decode.json      # smoke test

The model is the demo-sized one (configs/tiny.yaml: n = 4, r = 4) trained on the built-in code corpus,
the rank-4 run of experiments/rank_sweep.py; it is trained first when `--checkpoint` holds none. Prompts
are the first halves of held-out samples. `cpmtp bench decode` runs each prompt in both modes,
alternating, and takes medians (cpmtp_dist/inference/bench.py); this script runs it greedy and sampled
(temperature 1) and checks the targets: tokens per forward >= 2.0 at n = 4, wall-clock speed-up >= 0.85 x
tokens per forward; then greedy tree decoding (`--mode tree`) with each of `--branches`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers (report.py)
from report import write_section  # noqa: E402

BEGIN, END = "<!-- decode:begin -->", "<!-- decode:end -->"
DEFAULT_RUN = "runs/rank_sweep/r4"


def cpmtp(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "launchers.cli", *args], cwd=REPO, check=True)


def bench_in_process(*args: str) -> None:
    """`cpmtp bench decode ...` in this process (one start-up for all the runs)."""
    sys.path.insert(0, str(REPO))
    from launchers.cli import main as cli

    if (rc := cli(list(args))) != 0:
        raise SystemExit(f"cpmtp {' '.join(args)} failed with status {rc}")


def describe(ckpt: Path) -> str:
    """The model and data of a checkpoint, from its config.yaml."""
    sys.path.insert(0, str(REPO))
    from cpmtp_dist.checkpoint_paths import latest_checkpoint
    from cpmtp_dist.config_io import load_config

    cfg = load_config(latest_checkpoint(REPO / ckpt) / "config.yaml")
    t, cp = cfg.model.trunk, cfg.model.cp
    data = cfg.data.path or f"built-in {cfg.data.corpus} corpus"
    return (
        f"{t.num_layers} layers × {t.hidden_size}, V = {t.vocab_size}, n = {cp.horizon}, r = {cp.rank}, "
        f"{cp.parameterisation} heads, {cfg.train.steps} steps on {data}"
    )


def markdown(result: dict, command: str) -> str:
    rows = []
    for name, b in result["runs"].items():
        acc = ", ".join(f"{a:.2f}" for a in b["acceptance"])
        rows.append(
            f"| {name} | {b['ar_tokens_per_s']:.1f} | {b['speculative_tokens_per_s']:.1f} | "
            f"{b['tokens_per_forward']:.2f} | {acc} | {b['speedup']:.2f}× | {b['speedup_over_tokens_per_forward']:.2f} |"
        )
    g = result["runs"]["greedy"]
    verdict = (
        f"Targets (greedy): tokens per forward {g['tokens_per_forward']:.2f} "
        f"({'meets' if g['tokens_per_forward'] >= 2.0 else 'misses'} ≥ 2.0); speed-up / tokens per forward "
        f"{g['speedup_over_tokens_per_forward']:.2f} "
        f"({'meets' if g['speedup_over_tokens_per_forward'] >= 0.85 else 'misses'} ≥ 0.85)."
    )
    b = result["runs"]["greedy"]
    return (
        f"Command: `{command}`. Model: `{result['checkpoint']}` ({result['model']}); {b['prompts']} held-out prompts of half a sequence, {b['max_new_tokens']} new tokens each, "
        f"batch 1, KV cache in both modes, median of {b['repeats']} alternating runs per prompt and mode, "
        f"{b['machine']['torch_threads']} torch threads ({b['machine']['cpu']}), on {b.get('device', 'cpu')} in "
        f"{b.get('dtype', 'float32')}.\n\n"
        "| decoding | autoregressive tokens/s | drafted tokens/s | tokens per forward | acceptance s=1..4 "
        "| speed-up | speed-up / tokens per forward |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        + verdict + "\n"
    )  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint", default=f"{DEFAULT_RUN}/checkpoints", help="checkpoint or checkpoints/ folder"
    )
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--markdown", help="write the results into this file's decode section")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--branches", type=int, nargs="*", default=[2, 4], help="greedy tree decoding runs")
    p.add_argument(
        "--quick", action="store_true", help="2 prompts, 16 tokens, 1 repeat, trees of 4 only (smoke test)"
    )
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="as `cpmtp bench decode`"
    )
    args = p.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens, args.repeats, args.branches = 2, 16, 1, [4]

    ckpt = Path(args.checkpoint)
    if not (REPO / ckpt / "latest").exists() and not (REPO / ckpt / "meta.json").exists():
        run = (REPO / ckpt).parent
        print(f"no checkpoint in {ckpt}: training configs/tiny.yaml into {run}", flush=True)
        cpmtp("train", "--config", "configs/tiny.yaml", "--run-dir", str(run))
    common = ["bench", "decode", "--checkpoint", str(REPO / ckpt), "--prompts", str(args.prompts),
              "--max-new-tokens", str(args.max_new_tokens), "--repeats", str(args.repeats), "--tracking-uri", "none", "--device", args.device]  # fmt: skip
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = [
            (f"tree, k = {k} (greedy)", ["--greedy", "--mode", "tree", "--branches", str(k)])
            for k in args.branches
        ]
        for name, extra in [("greedy", ["--greedy"]), ("sampling, T = 1", ["--temperature", "1.0"]), *trees]:
            out = Path(tmp) / "bench.json"
            bench_in_process(*common, "--out", str(out), *extra)
            runs[name] = json.loads(out.read_text())
    result = {"checkpoint": str(ckpt), "model": describe(ckpt), "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    command = "python bench/decode.py " + " ".join(sys.argv[1:])
    if args.markdown:
        write_section(
            Path(args.markdown),
            BEGIN,
            END,
            "## Decoding: autoregressive vs self-speculative and tree\n\n"
            + markdown(result, command.strip()),
        )
    print(markdown(result, command.strip()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
