"""The paper's head-only experiment: CP heads of rank r at n = 4 fine-tuned on a frozen next-token trunk.

    python experiments/head_sweep.py                              # the trunk of experiments/trunk.py, ~2 h
    python experiments/head_sweep.py --ranks 1 8 --steps 50 --root runs/head_quick --results /tmp/r.md

The trunk is `--trunk` (default `runs/trunk/run/checkpoints`, what `python experiments/trunk.py` trains:
n = r = 1 on the built-in code and prose shards). For each distillation weight β (`--betas`, default 0 and
0.5) and each rank r (`--ranks`, default 1 2 4 8), with equal steps, data order and seed: `cpmtp train` with
`finetune.init_from` the trunk and `finetune.freeze_trunk=true` (only the head trains; skipped when the run
holds its final checkpoint, resumed when it holds an earlier one); then on the held-out split of each corpus
(code, prose): `cpmtp eval` (joint and per-head loss, expert usage, acceptance per head position and tokens
per forward of self-speculative decoding, greedy and sampled at T = 1) and `cpmtp bench decode` greedy and
at T = 0.8 (tokens per forward and wall-clock speed-up over autoregressive decoding, batch 1), and greedy
tree decoding with `--branches` children per step (`--mode tree`; one branch is the speculative chain). Two
tables and one figure go to `--results` (docs/RESULTS.md, section "head_sweep") and, with every per-run file,
to one MLflow run of the experiment `head_sweep` in `<root>/mlflow.db`.

Why β = 0.5 next to 0: self-speculative decoding accepts a drafted token when it agrees with the model's own
next-token distribution; distillation trains each head position's conditional towards the trunk's own
next-token prediction at that position (docs/FINETUNE.md), which is what acceptance measures, while the other
half of the loss keeps the heads on the data. β = 1 would drop the data term altogether.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "experiments"))
from rank_sweep import cpmtp, eval_row, final_step, train_tokens_per_s  # noqa: E402
from report import write_section  # noqa: E402
from trunk import default_data_dir  # noqa: E402

sys.path.insert(0, str(REPO))
from cpmtp_dist.config_io import load_config  # noqa: E402
from cpmtp_dist.training.tracking import log_summary_run  # noqa: E402

BEGIN, END = "<!-- head_sweep:begin -->", "<!-- head_sweep:end -->"
FINETUNE = ["train.global_batch_size=16", "train.micro_batch_size=16", "optim.lr=3e-3", "optim.min_lr=3e-4"]
"""The heads' recipe (docs/RESULTS.md): 16 × 128 tokens per step, a learning rate 3× the trunk's (only the head
trains, from the trunk's own next-token head)."""
CORPORA = ("code", "prose")


def finetune(run: Path, config: str, overrides: list[str], uri: str) -> None:
    steps = load_config(REPO / config, overrides).train.steps
    done = final_step(run)
    if done >= steps:
        return
    resume = ["--resume", "auto"] if done else []
    cpmtp("train", "--config", config, "--run-dir", str(run), "--tracking-uri", uri, "--experiment", "head_sweep",
          *resume, *overrides)  # fmt: skip


def measure(run: Path, data: Path, args: argparse.Namespace, uri: str) -> tuple[dict, list[Path]]:
    """`cpmtp eval` and `cpmtp bench decode` (greedy, T = 0.8, trees) of the run's head on each corpus; a
    result file newer than the run's final checkpoint is reused (a rerun of the sweep measures only what is
    missing)."""
    ckpt, row, files = str(run / "checkpoints"), {}, []
    trained = (run / "checkpoints" / "latest").stat().st_mtime
    for corpus in CORPORA:
        ev_path = run / f"eval_{corpus}.json"
        if not (ev_path.exists() and ev_path.stat().st_mtime > trained):
            cpmtp("eval", "--checkpoint", ckpt, "--data", str(data / corpus), "--out", str(ev_path),
                  "--batches", str(args.eval_batches), "--prompts", str(args.prompts), "--new-tokens",
                  str(args.new_tokens), "--tracking-uri", uri, "--experiment", "head_sweep")  # fmt: skip
        out = eval_row(json.loads(ev_path.read_text()), args.horizon)
        files.append(ev_path)
        benches = [("greedy", ["--greedy"]), ("t08", ["--temperature", "0.8"])] + [
            (f"tree{k}", ["--greedy", "--mode", "tree", "--branches", str(k)]) for k in args.branches
        ]
        for name, extra in benches:
            path = run / f"bench_{corpus}_{name}.json"
            if not (path.exists() and path.stat().st_mtime > trained):
                cpmtp("bench", "decode", "--checkpoint", ckpt, "--data", str(data / corpus), "--out", str(path),
                      "--prompts", str(args.prompts), "--max-new-tokens", str(args.new_tokens), "--repeats",
                      str(args.repeats), "--tracking-uri", "none", *extra)  # fmt: skip
            bd = json.loads(path.read_text())
            out[f"bench_tpf_{name}"], out[f"speedup_{name}"] = bd["tokens_per_forward"], bd["speedup"]
            out[f"acceptance_{name}"] = bd["acceptance"]
            if "kept_branch" in bd:
                out[f"kept_branch_{name}"] = bd["kept_branch"]
            files.append(path)
        row[corpus] = out
    return row, files


def table(rows: list[dict]) -> str:
    lines = [
        "| β | r | held-out | joint loss | head 1-4 loss | tokens/forward greedy | acceptance s=2,3,4 (greedy) "
        "| tokens/forward T=1 | tokens/forward T=0.8 | speed-up greedy | speed-up T=0.8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for corpus in CORPORA:
            m = r[corpus]
            heads = ", ".join(f"{x:.2f}" for x in m["head_losses"])
            acc = ", ".join(f"{a:.2f}" for a in m["acceptance_greedy"][1:])
            lines.append(
                f"| {r['beta']:g} | {r['rank']} | {corpus} | {m['joint_loss']:.3f} | {heads} | {m['tpf_greedy']:.2f} "
                f"| {acc} | {m['tpf_sampling']:.2f} | {m['bench_tpf_t08']:.2f} | {m['speedup_greedy']:.2f}× "
                f"| {m['speedup_t08']:.2f}× |"
            )
    return "\n".join(lines) + "\n"


def tree_table(rows: list[dict], branches: list[int]) -> str:
    """Greedy tokens per forward and speed-up of tree decoding by branches (1: the speculative chain)."""
    ks = [1, *branches]
    names = {1: "greedy", **{k: f"tree{k}" for k in branches}}
    lines = [
        "| β | r | held-out | " + " | ".join(f"tokens/forward k={k}" for k in ks) + " | "
        + " | ".join(f"speed-up k={k}" for k in ks) + " | kept child 1..k (largest k) |",
        "|---|---|---|" + "---|" * (2 * len(ks) + 1),
    ]  # fmt: skip
    for r in rows:
        for corpus in CORPORA:
            m = r[corpus]
            tpf = " | ".join(f"{m[f'bench_tpf_{names[k]}']:.2f}" for k in ks)
            speed = " | ".join(f"{m[f'speedup_{names[k]}']:.2f}×" for k in ks)
            kept = ", ".join(str(c) for c in m.get(f"kept_branch_{names[ks[-1]]}", []))
            lines.append(f"| {r['beta']:g} | {r['rank']} | {corpus} | {tpf} | {speed} | {kept} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CORPORA), figsize=(9, 3.4), sharey=True)
    for ax, corpus in zip(axes, CORPORA, strict=True):
        for beta in sorted({r["beta"] for r in rows}):
            sel = [r for r in rows if r["beta"] == beta]
            ranks = [r["rank"] for r in sel]
            ax.plot(ranks, [r[corpus]["tpf_greedy"] for r in sel], "o-", label=f"greedy, β = {beta:g}")
            ax.plot(ranks, [r[corpus]["bench_tpf_t08"] for r in sel], "s--", label=f"T = 0.8, β = {beta:g}")
        ax.set_xscale("log", base=2)
        every = sorted({r["rank"] for r in rows})
        ax.set_xticks(every, [str(x) for x in every])
        ax.set_xlabel("rank r")
        ax.set_title(f"held-out {corpus}")
    axes[0].set_ylabel("tokens per forward")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trunk", default="runs/trunk/run/checkpoints", help="the frozen trunk's checkpoint(s)")
    p.add_argument("--config", default="configs/trunk.yaml", help="the trunk's config (model.trunk.*)")
    p.add_argument("--data", type=Path, default=None, help="the demo's data folder (experiments/trunk.py's)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument(
        "--distill-ranks", type=int, nargs="+", help="the ranks of the β > 0 heads (default: --ranks)"
    )
    p.add_argument(
        "--betas", type=float, nargs="+", default=[0.0, 0.5], help="finetune.distill_weight values"
    )
    p.add_argument("--horizon", type=int, default=4)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps per head")
    p.add_argument("--root", default="runs/head_sweep")
    p.add_argument("--results", default="docs/RESULTS.md")
    p.add_argument("--figure", default="docs/img/head_sweep.png")
    p.add_argument("--json", default="bench/results/head_sweep.json")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4, help="held-out prompts decoded per model and corpus")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="timed runs per prompt and mode in bench decode")
    p.add_argument("--branches", type=int, nargs="*", default=[2, 4], help="tree decoding's branch counts")
    p.add_argument("overrides", nargs="*", help="more `cpmtp train` overrides, the same for every head")
    args = p.parse_args()

    data = (args.data or default_data_dir()).resolve()
    trunk = (REPO / args.trunk).resolve()
    root = (REPO / args.root).resolve()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = [f"model.cp.horizon={args.horizon}", f"finetune.init_from={trunk}", "finetune.freeze_trunk=true",
            f"data.path=0.8 {data / 'code'} 0.2 {data / 'prose'}", f"train.steps={args.steps}",
            f"optim.warmup_steps={max(1, args.steps // 20)}", "train.eval_every=0", "checkpoint.every=100",
            *FINETUNE, *args.overrides]  # fmt: skip
    rows, files = [], []
    for beta in args.betas:
        for r in args.ranks if beta == 0 or args.distill_ranks is None else args.distill_ranks:
            run = root / f"beta{beta:g}_r{r}"
            finetune(run, args.config, [*base, f"model.cp.rank={r}", f"finetune.distill_weight={beta}"], uri)
            row, produced = measure(run, data, args, uri)
            rows.append({"beta": beta, "rank": r, "train_tokens_per_s": train_tokens_per_s(run), **row})
            files += produced

    out_json, figure, results = REPO / args.json, REPO / args.figure, REPO / args.results
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"trunk": str(trunk), "overrides": base, "rows": rows}, indent=2) + "\n")
    plot(rows, figure)
    command = "python experiments/head_sweep.py " + " ".join(sys.argv[1:])
    section = (
        f"Command: `{command.strip()}` (trunk `{args.trunk}`, {args.config}, n = {args.horizon}, "
        f"{args.steps} steps per head).\n\n" + table(rows)
        + "\nGreedy tree decoding (`cpmtp bench decode --greedy --mode tree --branches k`; k = 1 is the speculative "
        "chain of the table above) and how often the kept second token was the head's 1st, 2nd, ... choice:\n\n"
        + tree_table(rows, args.branches)
        + f"\n![tokens per forward against r]({os.path.relpath(figure, results.parent)})\n"
    )  # fmt: skip
    write_section(results, BEGIN, END, section)
    metrics = {
        f"{key}_{c}_b{r['beta']:g}_r{r['rank']}": r[c][key]
        for r in rows
        for c in CORPORA
        for key in (
            "joint_loss",
            "tpf_greedy",
            "tpf_sampling",
            "bench_tpf_t08",
            "speedup_greedy",
            "speedup_t08",
            *(f"{kind}_tree{k}" for k in args.branches for kind in ("bench_tpf", "speedup")),
        )
    }
    rid = log_summary_run(uri, "head_sweep", f"head sweep n={args.horizon} r={args.ranks} beta={args.betas}",
                          params={"trunk": str(trunk), "overrides": " ".join(base)}, metrics=metrics,
                          artifacts=[out_json, figure, results, *files], tags={"cpmtp.kind": "head_sweep"})  # fmt: skip
    print(f"{results} and {figure} written; MLflow run {rid} at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
