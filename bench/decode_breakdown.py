"""Where a decoding step spends its time: autoregressive vs self-speculative, per trunk forward.

    python bench/decode_breakdown.py --checkpoint runs/rank_sweep/r4/checkpoints

Decodes the held-out prompts of `cpmtp bench decode` in each mode (greedy, batch 1; tree with `--branches`)
with timers around the trunk's cached forward, the head at the verified tokens (gate, factors, next-token
marginal), the draft (tree or chain, with the factors it computes itself) and the verification walk; prints
the median of each per call (by the number of tokens, or the draft's depth) and each mode's median time per
step (one trunk forward; runs alternate between the modes). The speed-up of a drafted mode is (tokens per
forward) × (autoregressive step) / (its step), the prefill aside.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import cpmtp_dist.inference.decoding as decoding  # noqa: E402
from cpmtp_dist.inference.evaluation import heldout_batches, heldout_prompts  # noqa: E402
from cpmtp_dist.inference.generate import load_for_inference  # noqa: E402


def timed(fn, sink: list, key=lambda *a: 0):
    def wrapper(*args, **kwargs):
        tic = time.perf_counter()
        out = fn(*args, **kwargs)
        sink.append((key(*args), time.perf_counter() - tic))
        return out

    return wrapper


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="runs/rank_sweep/r4/checkpoints")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--branches", type=int, default=2, help="tree mode's branches")
    args = p.parse_args()

    loaded = load_for_inference(REPO / args.checkpoint)
    batches = heldout_batches(
        loaded.checkpoint / "config.yaml", loaded.tokenizer.fingerprint, None, args.prompts
    )
    prompts = heldout_prompts(batches, args.prompts, loaded.config.model.trunk.seq_length // 2)
    dec = decoding.Decoder(loaded.model)
    calls: dict[str, list] = defaultdict(list)
    dec.cache.extend = timed(dec.cache.extend, calls["trunk forward"], key=lambda t, p=None: len(t))
    dec._head = timed(dec._head, calls["head at verified tokens"], key=lambda h, g: h.shape[0])
    dec._draft = timed(dec._draft, calls["draft"], key=lambda first, at, depth, *a: depth)
    dec._verify = timed(dec._verify, calls["verification walk"])
    per_mode: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.repeats):
        for prompt in prompts:
            for mode in decoding.MODES:
                st = dec.generate(prompt, args.max_new_tokens, mode=mode, branches=args.branches).stats
                per_mode[mode].append(st.seconds / st.forwards)
    for name, rows in calls.items():
        by_size: dict = defaultdict(list)
        for size, seconds in rows:
            by_size[size].append(seconds)
        cells = ", ".join(
            f"{k}: {statistics.median(v) * 1e3:.2f} ms × {len(v)}" for k, v in sorted(by_size.items())
        )
        print(f"{name:24s} {cells}")
    ar = statistics.median(per_mode["ar"])
    for mode, steps in per_mode.items():
        step = statistics.median(steps)
        print(f"{mode:24s} {step * 1e3:.2f} ms per step (incl. the prefill's share), {step / ar:.2f}× ar")
    return 0


if __name__ == "__main__":
    sys.exit(main())
