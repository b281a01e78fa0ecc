"""Benchmark of the trunk's core attention: `sdpa` (torch's scaled_dot_product_attention) vs `local`
(Megatron's DotProductAttention), a training step of the trunk (forward + backward) with the same weights.

    python bench/attention.py --out bench/results/attention_cpu.json --markdown docs/BENCHMARKS.md
    python bench/attention.py --quick --out /tmp/attention.json                       # smoke test

Alternating runs (local, sdpa, local, sdpa, ...) so that drifts of a shared machine hit both alike; each
sequence length's time is the median of the repeats after one warm-up. Runs on the CPU here and on the current
CUDA device where one is visible.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helpers (report.py)
from report import write_section  # noqa: E402

BEGIN, END = "<!-- attention:begin -->", "<!-- attention:end -->"


def step_seconds(
    seq_lens: list[int], *, batch: int, width: int, layers: int, heads: int, repeats: int
) -> dict:
    """Median seconds of one trunk forward + backward per attention kind and sequence length."""
    import torch

    from cpmtp_dist.config import TrunkConfig
    from cpmtp_dist.model.trunk import build_trunk, init_trunk_weights, trunk_hidden
    from cpmtp_dist.parallel.pipeline import PipelineStage
    from cpmtp_dist.parallel.state import initialize_parallel

    initialize_parallel(1, 1, 1, seed=0)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    rows = []
    for seq in seq_lens:
        models = {}
        for kind in ("local", "sdpa"):
            cfg = TrunkConfig(num_layers=layers, hidden_size=width, num_attention_heads=heads, seq_length=seq,
                              vocab_size=2048, attention=kind)  # fmt: skip
            models[kind] = build_trunk(cfg)
            init_trunk_weights(models[kind], cfg, seed=0, stage=PipelineStage())
            models[kind].to(device)
        tokens = torch.randint(0, 2048, (batch, seq), device=device)
        times: dict[str, list[float]] = {kind: [] for kind in models}
        for rep in range(repeats + 1):
            for kind, model in models.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                tic = time.perf_counter()
                trunk_hidden(model, tokens).square().mean().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if rep:  # the first round warms up
                    times[kind].append(time.perf_counter() - tic)
        local, sdpa = (statistics.median(times[k]) for k in ("local", "sdpa"))
        rows.append({"seq_len": seq, "local_s": local, "sdpa_s": sdpa, "sdpa_over_local": sdpa / local})
    return {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "batch": batch,
        "width": width,
        "layers": layers,
        "heads": heads,
        "repeats": repeats,
        "rows": rows,
    }


def markdown(result: dict, command: str) -> str:
    rows = "\n".join(
        f"| {r['seq_len']} | {1000 * r['local_s']:.0f} | {1000 * r['sdpa_s']:.0f} | {r['sdpa_over_local']:.2f} |"
        for r in result["rows"]
    )
    return (
        "## Core attention: sdpa vs local (trunk forward + backward)\n\n"
        f"Command: `{command}`. Trunk of {result['layers']} layers × {result['width']}, {result['heads']} heads, "
        f"batch {result['batch']}, fp32, on {result['device']} ({result['torch_threads']} torch threads); median "
        f"of {result['repeats']} alternating runs after a warm-up.\n\n"
        "| sequence length | local ms | sdpa ms | sdpa / local |\n|---|---|---|---|\n" + rows + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file for the results")
    p.add_argument("--markdown", help="write the results into this file's attention section")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--quick", action="store_true", help="short sequences, one repeat, a narrow trunk (smoke test)"
    )
    args = p.parse_args(argv)
    sizes = {"batch": 2, "width": 256, "layers": 4, "heads": 4}
    if args.quick:
        args.seq_lens, args.repeats, sizes = [32], 1, {"batch": 1, "width": 32, "layers": 1, "heads": 2}
    result = step_seconds(args.seq_lens, repeats=args.repeats, **sizes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    command = "python bench/attention.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(result, command.strip())
    if args.markdown:
        write_section(Path(args.markdown), BEGIN, END, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
