"""Where a decoding step spends its time: autoregressive vs self-speculative, per trunk forward.

    python bench/decode_breakdown.py --checkpoint runs/rank_sweep/r4/checkpoints

Decodes the held-out prompts of `cpmtp bench decode` in both modes (greedy, batch 1) with timers around
the trunk's cached forward, the verifier's next-token distributions and the drafting chain; prints the
median of each per call and the mean time per step (one trunk forward) of each mode. The speed-up of
speculative decoding is (tokens per forward) × (autoregressive step) / (speculative step), the prefill aside.
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
    args = p.parse_args()

    loaded = load_for_inference(REPO / args.checkpoint)
    batches = heldout_batches(
        loaded.checkpoint / "config.yaml", loaded.tokenizer.fingerprint, None, args.prompts
    )
    prompts = heldout_prompts(batches, args.prompts, loaded.config.model.trunk.seq_length // 2)
    dec = decoding.Decoder(loaded.model)
    calls: dict[str, list] = defaultdict(list)
    dec.cache.extend = timed(dec.cache.extend, calls["trunk forward"], key=lambda t: len(t))
    dec._first_factors = timed(dec._first_factors, calls["verifier distributions"], key=lambda h: h.shape[0])
    dec.head.factor_log_probs = timed(
        dec.head.factor_log_probs, calls["head factors"], key=lambda h, u, s: (h.shape[0], s.start)
    )
    decoding.draft_from_factors = timed(decoding.draft_from_factors, calls["drafting chain"])  # fmt: skip
    per_mode = {m: [0.0, 0] for m in decoding.MODES}
    for _ in range(args.repeats):
        for prompt in prompts:
            for mode in decoding.MODES:
                st = dec.generate(prompt, args.max_new_tokens, mode=mode).stats
                per_mode[mode][0] += st.seconds
                per_mode[mode][1] += st.forwards
    for name, rows in calls.items():
        by_size: dict = defaultdict(list)
        for size, seconds in rows:
            by_size[size].append(seconds)
        cells = ", ".join(
            f"{k}: {statistics.median(v) * 1e3:.2f} ms × {len(v)}" for k, v in sorted(by_size.items())
        )
        print(f"{name:24s} {cells}")
    for mode, (seconds, forwards) in per_mode.items():
        print(
            f"{mode:24s} {seconds / forwards * 1e3:.2f} ms per step (incl. the prefill's share), {forwards} steps"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
