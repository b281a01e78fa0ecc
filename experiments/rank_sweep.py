"""The paper's experiment: the same trunk and data, CP heads of rank r in {1, 2, 4, 8} at n = 4.

    python experiments/rank_sweep.py                       # configs/tiny.yaml, 300 steps each, ~30 min on 2 cores
    python experiments/rank_sweep.py --ranks 1 8 --steps 100 --root runs/quick_sweep --results /tmp/r.md

For each rank: `cpmtp train` (equal steps, data order and seed; skipped when the run already holds its
final checkpoint, resumed when it holds an earlier one), `cpmtp eval` (held-out joint and next-token loss,
per-head accuracy, expert usage, tokens per forward and acceptance of self-speculative decoding, greedy and
sampled) and `cpmtp bench decode` (wall-clock speed-up of speculative over autoregressive decoding,
greedy, batch 1). Then one table and one figure (joint loss and tokens per forward against r) go to
`--results` (docs/RESULTS.md) and, with every per-rank file, to one MLflow run of the experiment
`rank_sweep` in `<root>/mlflow.db`. Each training run tracks itself in its own run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from report import write_section  # noqa: E402

sys.path.insert(0, str(REPO))
from cpmtp_dist.config_io import load_config  # noqa: E402
from cpmtp_dist.training.tracking import log_summary_run  # noqa: E402

BEGIN, END = "<!-- rank_sweep:begin -->", "<!-- rank_sweep:end -->"


def cpmtp(*args: str) -> None:
    cmd = [sys.executable, "-m", "launchers.cli", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def final_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    if not latest.exists():
        return 0
    return json.loads((run / "checkpoints" / latest.read_text().strip() / "meta.json").read_text())["step"]


def train_tokens_per_s(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r)


def eval_row(ev: dict, horizon: int) -> dict:
    """The numbers of a `cpmtp eval` result that the sweeps tabulate (sampling: at temperature 1)."""
    h, dec = ev["heldout"], ev["decoding"]
    return {
        "joint_loss": h["joint_loss"],
        "ntp_loss": h["ntp_loss"],
        "head_losses": [h[f"head_loss_{s}"] for s in range(1, horizon + 1)],
        "expert_usage": h["expert_usage"],
        "tpf_greedy": dec["greedy"]["tokens_per_forward"],
        "acceptance_greedy": dec["greedy"]["acceptance"],
        "tpf_sampling": dec["sampling_t1"]["tokens_per_forward"],
        "acceptance_sampling": dec["sampling_t1"]["acceptance"],
    }


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = [r["rank"] for r in rows]
    panels = [
        ("held-out joint loss (nats)", "joint loss of the next n tokens", [("joint_loss", "o-", "joint")]),
        ("tokens per forward", "self-speculative decoding",
         [("tpf_greedy", "o-", "greedy"), ("tpf_sampling", "s-", "sampling, T = 1")]),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (ylabel, title, series) in zip(axes, panels, strict=True):
        for key, style, label in series:
            ax.plot(ranks, [r[key] for r in rows], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(x) for x in ranks])
        ax.set_xlabel("rank r")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    head = (
        "| r | joint loss | next-token loss | head 2-4 loss | tokens/forward greedy | acceptance s=2,3,4 (greedy) "
        "| tokens/forward sampling | decode speed-up (greedy) | training tokens/s |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        acc = ", ".join(f"{a:.2f}" for a in r["acceptance_greedy"][1:])
        heads = ", ".join(f"{x:.2f}" for x in r["head_losses"][1:])
        lines.append(
            f"| {r['rank']} | {r['joint_loss']:.3f} | {r['ntp_loss']:.3f} | {heads} | {r['tpf_greedy']:.2f} | {acc} "
            f"| {r['tpf_sampling']:.2f} | {r['speedup']:.2f}× | {r['train_tokens_per_s']:.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--horizon", type=int, default=4)
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    p.add_argument("--root", default="runs/rank_sweep", help="one run directory per rank below it")
    p.add_argument("--results", default="docs/RESULTS.md", help="markdown file for the table and figure")
    p.add_argument("--figure", default="docs/img/rank_sweep.png")
    p.add_argument("--json", default="bench/results/rank_sweep.json")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts decoded per model")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("overrides", nargs="*", help="more `cpmtp train` overrides, the same for every rank")
    args = p.parse_args()

    root = (REPO / args.root).resolve()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = [f"model.cp.horizon={args.horizon}", *args.overrides]
    if args.steps is not None:
        base.append(f"train.steps={args.steps}")
    rows, files = [], []
    for r in args.ranks:
        run = root / f"r{r}"
        train = ["train", "--config", args.config, f"model.cp.rank={r}", *base, "--run-dir", str(run),
                 "--experiment", "rank_sweep"]  # fmt: skip
        cfg_steps = load_config(REPO / args.config, [f"model.cp.rank={r}", *base]).train.steps
        done = final_step(run)
        if done == 0:
            cpmtp(*train)
        elif done < cfg_steps:
            cpmtp(*train, "--resume", "auto")
        eval_json, bench_json = run / "eval.json", run / "bench_decode.json"
        ckpt = str(run / "checkpoints")
        cpmtp("eval", "--checkpoint", ckpt, "--out", str(eval_json), "--batches", str(args.eval_batches),
              "--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens), "--tracking-uri", uri,
              "--experiment", "rank_sweep")  # fmt: skip
        cpmtp("bench", "decode", "--checkpoint", ckpt, "--out", str(bench_json), "--prompts", str(args.prompts),
              "--max-new-tokens", str(args.new_tokens), "--repeats", "3", "--tracking-uri", "none")  # fmt: skip
        ev, bd = json.loads(eval_json.read_text()), json.loads(bench_json.read_text())
        rows.append({
            "rank": r,
            **eval_row(ev, args.horizon),
            "speedup": bd["speedup"],
            "bench_tokens_per_forward": bd["tokens_per_forward"],
            "train_tokens_per_s": train_tokens_per_s(run),
        })  # fmt: skip
        files += [(eval_json, f"r{r}"), (bench_json, f"r{r}")]

    out_json = REPO / args.json
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"config": args.config, "overrides": base, "rows": rows}, indent=2) + "\n")
    figure = REPO / args.figure
    plot(rows, figure)
    results = REPO / args.results
    rel = os.path.relpath(figure, results.parent)
    command = "python experiments/rank_sweep.py " + " ".join(sys.argv[1:])
    section = (
        f"Command: `{command.strip()}` ({args.config}, n = {args.horizon}, overrides: `{' '.join(base)}`).\n\n"
        + table(rows)
        + f"\n![joint loss and tokens per forward against r]({rel})\n"
    )
    write_section(results, BEGIN, END, section)

    metrics = {}
    for row in rows:
        for key in ("joint_loss", "ntp_loss", "tpf_greedy", "tpf_sampling", "speedup", "train_tokens_per_s"):
            metrics[f"{key}_r{row['rank']}"] = row[key]
    rid = log_summary_run(
        uri,
        "rank_sweep",
        f"rank sweep n={args.horizon} r={','.join(map(str, args.ranks))}",
        params={"config": args.config, "overrides": " ".join(base), "ranks": args.ranks},
        metrics=metrics,
        artifacts=[out_json, figure, results, *files],
        tags={"cpmtp.kind": "rank_sweep"},
    )
    print(f"{results} and {figure} written; MLflow run {rid} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
