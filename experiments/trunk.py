"""A next-token trunk worth decoding with: n = r = 1 on the built-in code and prose corpora, resumable.

    python experiments/trunk.py --scan                   # which size learns most per CPU-minute (~20 min)
    python experiments/trunk.py                          # configs/trunk.yaml for 20 M tokens; rerun to continue
    python experiments/trunk.py --tokens 5e6 --root runs/trunk_small

The data are `make demo`'s: a 2048-token BPE tokenizer trained on both built-in corpora and shards of
128-token sequences of each (`--data`, default the demo's folder; built here when missing, an interrupted
build resumes). Training reads the blend 0.8 code / 0.2 prose, checkpoints every 250 steps and continues
from its newest checkpoint when run again (`cpmtp train --resume auto`), so a long run can span sessions or
survive a kill. At the end each held-out split (code, prose) is evaluated with `cpmtp eval` (next-token loss
and perplexity), and a table goes to `--results` (docs/RESULTS.md, section "trunk") and to MLflow
(`<root>/mlflow.db`, experiment `trunk`). The checkpoint is not committed: this script reproduces it.

`--scan` trains each candidate size (SIZES) for the same wall-clock budget on this machine (`--minutes`,
its steps set from a short probe of its throughput so that the learning-rate schedule completes), evaluates
each the same way and writes the comparison (section "trunk_scan"): the size with the lowest held-out loss
per CPU budget is the one `configs/trunk.yaml` should carry.
"""

from __future__ import annotations

import argparse
import json
import math
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
from cpmtp_dist.plan import params_per_rank  # noqa: E402
from cpmtp_dist.training.tracking import log_summary_run  # noqa: E402

CONFIG = "configs/trunk.yaml"
SIZES = {  # layers x width (heads of 32 dimensions): the size scan's candidates
    "4x128": ["model.trunk.num_layers=4", "model.trunk.hidden_size=128", "model.trunk.num_attention_heads=4"],
    "6x256": ["model.trunk.num_layers=6", "model.trunk.hidden_size=256", "model.trunk.num_attention_heads=8"],
    "8x384": [
        "model.trunk.num_layers=8",
        "model.trunk.hidden_size=384",
        "model.trunk.num_attention_heads=12",
    ],
}
SEQ = 128


def cpmtp(*args: str) -> str:
    """Run a `cpmtp` command (its output shown); returns its standard output."""
    cmd = [sys.executable, "-m", "launchers.cli", *args]
    print("+ cpmtp", " ".join(args), flush=True)
    res = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    print(res.stdout[-2000:], end="", flush=True)
    if res.returncode != 0:
        raise SystemExit(f"cpmtp {args[0]} failed with status {res.returncode}")
    return res.stdout


def default_data_dir() -> Path:
    """`make demo`'s data folder (the Makefile's DATA_DIR)."""
    cache = Path(os.environ.get("CPMTP_CACHE_DIR", Path.home() / ".cache" / "cpmtp_dist"))
    return cache / f"demo-data-py{sys.version_info.major}{sys.version_info.minor}"


def ensure_data(data: Path) -> None:
    """The demo's tokenizer and shards (the Makefile's commands); a partial build resumes."""
    if (data / ".complete").exists():
        return
    cpmtp("data", "tokenizer", "--input", "builtin:stdlib-code", "builtin:stdlib-prose", "--vocab-size", "2048",
          "--out", str(data / "tokenizer"))  # fmt: skip
    for name, size in (("code", "1"), ("prose", "0.25")):
        cpmtp("data", "shards", "--input", f"builtin:stdlib-{name}", "--tokenizer", str(data / "tokenizer"),
              "--seq-len", str(SEQ), "--shard-size-mb", size, "--heldout-fraction", "0.02",
              "--out", str(data / name))  # fmt: skip
    (data / ".complete").touch()


def final_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    if not latest.exists():
        return 0
    return json.loads((run / "checkpoints" / latest.read_text().strip() / "meta.json").read_text())["step"]


def train(run: Path, overrides: list[str], uri: str) -> None:
    """Train to the config's last step: from scratch, or on from the run's newest checkpoint."""
    steps = load_config(REPO / CONFIG, overrides).train.steps
    done = final_step(run)
    if done >= steps:
        print(f"{run}: trained ({done} steps)", flush=True)
        return
    resume = ["--resume", "auto"] if done else []
    cpmtp("train", "--config", CONFIG, "--run-dir", str(run), "--tracking-uri", uri, "--experiment", "trunk",
          *resume, *overrides)  # fmt: skip


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def tokens_per_s(run: Path) -> float:
    """The median training throughput, the first logged row (warm-up) left out."""
    rows = [r["tokens_per_s"] for r in metrics(run) if "tokens_per_s" in r]
    return statistics.median(rows[1:] or rows)


def evaluate(run: Path, data: Path, batches: int) -> dict[str, dict]:
    """Held-out next-token loss and perplexity of the run's newest checkpoint on each corpus."""
    out = {}
    for name in ("code", "prose"):
        path = run / f"eval_{name}.json"
        cpmtp("eval", "--checkpoint", str(run / "checkpoints"), "--data", str(data / name), "--out", str(path),
              "--batches", str(batches), "--prompts", "0", "--tracking-uri", "none")  # fmt: skip
        h = json.loads(path.read_text())["heldout"]
        out[name] = {"ntp_loss": h["ntp_loss"], "ppl": math.exp(h["ntp_loss"])}
    return out


def model_overrides(data: Path, tokens: float) -> list[str]:
    steps = max(1, round(tokens / (load_config(REPO / CONFIG).train.global_batch_size * SEQ)))
    return [f"data.path=0.8 {data / 'code'} 0.2 {data / 'prose'}", f"train.steps={steps}"]


def scan(args: argparse.Namespace, data: Path, root: Path, uri: str) -> list[dict]:
    """Each size for `args.minutes` of training on this machine; their held-out losses."""
    rows = []
    tokens_per_step = load_config(REPO / CONFIG).train.global_batch_size * SEQ
    for name, size in SIZES.items():
        probe = root / "scan" / f"{name}_probe"
        train(probe, [*model_overrides(data, 12 * tokens_per_step), *size, "train.log_every=2",
                      "checkpoint.every=0", "train.eval_every=0", "tracking.enabled=false"], uri)  # fmt: skip
        speed = tokens_per_s(probe)
        steps = max(20, round(args.minutes * 60 * speed / tokens_per_step))
        run = root / "scan" / name
        overrides = [
            *model_overrides(data, steps * tokens_per_step),
            *size,
            "optim.warmup_steps=" + str(steps // 20),
        ]
        train(run, overrides, uri)
        rows.append({"size": name, "tokens_per_s": tokens_per_s(run), "steps": steps,
                     "tokens": steps * tokens_per_step, **flat(evaluate(run, data, args.eval_batches)),
                     "parameters_m": parameters_m(overrides)})  # fmt: skip
    return rows


def parameters_m(overrides: list[str]) -> float:
    """Trunk and head parameters of the config with `overrides`, in millions (`cpmtp plan`'s count)."""
    return sum(params_per_rank(load_config(REPO / CONFIG, overrides), 1, 1, 1, 0)) / 1e6


def flat(ev: dict[str, dict]) -> dict[str, float]:
    return {f"{k}_{name}": v for name, d in ev.items() for k, v in d.items()}


def table(rows: list[dict]) -> str:
    lines = [
        "| trunk | parameters | steps | tokens | training tokens/s | held-out code: loss, ppl | held-out prose: loss, ppl |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['parameters_m']:.2f} M | {r['steps']} | {r['tokens'] / 1e6:.1f} M "
            f"| {r['tokens_per_s']:.0f} | {r['ntp_loss_code']:.3f}, {r['ppl_code']:.1f} "
            f"| {r['ntp_loss_prose']:.3f}, {r['ppl_prose']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs/trunk", help="run directories below it")
    p.add_argument("--data", type=Path, default=None, help="the demo's data folder (built when missing)")
    p.add_argument("--tokens", type=float, default=20e6, help="training tokens (default 20 M)")
    p.add_argument("--scan", action="store_true", help="compare the sizes at an equal wall-clock budget")
    p.add_argument("--minutes", type=float, default=5.0, help="the scan's training minutes per size")
    p.add_argument("--eval-batches", type=int, default=64, help="held-out micro-batches per corpus")
    p.add_argument("--results", default="docs/RESULTS.md")
    p.add_argument("--json", default=None, help="results file (default bench/results/trunk[_scan].json)")
    p.add_argument("overrides", nargs="*", help="more `cpmtp train` overrides")
    args = p.parse_args()

    data = (args.data or default_data_dir()).resolve()
    ensure_data(data)
    root = (REPO / args.root).resolve()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    command = "python experiments/trunk.py " + " ".join(sys.argv[1:])
    kind = "trunk_scan" if args.scan else "trunk"
    if args.scan:
        rows = scan(args, data, root, uri)
    else:
        run = root / "run"
        overrides = [*model_overrides(data, args.tokens), *args.overrides]
        train(run, overrides, uri)
        tokens = final_step(run) * load_config(REPO / CONFIG, overrides).train.global_batch_size * SEQ
        rows = [{"size": "configs/trunk.yaml", "parameters_m": parameters_m(overrides), "steps": final_step(run),
                 "tokens": tokens, "tokens_per_s": tokens_per_s(run), **flat(evaluate(run, data, args.eval_batches))}]  # fmt: skip
    out = REPO / (args.json or f"bench/results/{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    section = f"Command: `{command.strip()}`.\n\n" + table(rows)
    write_section(REPO / args.results, f"<!-- {kind}:begin -->", f"<!-- {kind}:end -->", section)
    log_summary_run(uri, "trunk", kind, params={"command": command},
                    metrics={f"{k}_{r['size']}": v for r in rows for k, v in r.items() if isinstance(v, float)},
                    artifacts=[out], tags={"cpmtp.kind": kind})  # fmt: skip
    print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
