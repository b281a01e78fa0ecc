"""`cpmtp bench decode`: autoregressive vs self-speculative decoding of the same model and prompts.

Batch 1, KV cache in both modes. Every prompt is decoded `repeats` times in each mode, alternating
(A B A B ...) so that drifts of a shared machine hit both alike; a prompt's time in a mode is the median
of its repeats, and each mode's tokens per second is all new tokens over the sum of those medians. In
greedy mode the two outputs must be equal token for token (checked: a difference fails the benchmark).
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Sequence

import torch

from cpmtp_dist.inference.decoding import Decoder
from cpmtp_dist.inference.evaluation import merge_stats
from cpmtp_dist.inference.sampling import Sampling


def bench_decode(
    decoder: Decoder,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    sampling: Sampling,
    repeats: int = 3,
    eos_id: int | None = None,
) -> dict:
    decoder.generate(prompts[0], min(8, max_new_tokens), mode="speculative", sampling=sampling)  # warm-up
    times: dict[str, list[float]] = {"ar": [], "speculative": []}
    stats: dict[str, list] = {"ar": [], "speculative": []}
    tokens = {"ar": 0, "speculative": 0}
    for i, prompt in enumerate(prompts):
        per_mode: dict[str, list[float]] = {"ar": [], "speculative": []}
        outputs: dict[str, list[int]] = {}
        for rep in range(repeats):
            for mode in ("ar", "speculative"):
                out = decoder.generate(
                    prompt, max_new_tokens, mode=mode, sampling=sampling, eos_id=eos_id, seed=1000 * i + rep
                )
                per_mode[mode].append(out.stats.seconds)
                if rep == 0:
                    stats[mode].append(out.stats)
                    tokens[mode] += out.stats.new_tokens
                    outputs[mode] = out.tokens
        if sampling.greedy and outputs["ar"] != outputs["speculative"]:
            raise AssertionError(f"prompt {i}: greedy speculative output differs from greedy autoregressive")
        for mode in times:
            times[mode].append(statistics.median(per_mode[mode]))
    ar_tps = tokens["ar"] / sum(times["ar"])
    spec_tps = tokens["speculative"] / sum(times["speculative"])
    spec = merge_stats(stats["speculative"])
    speedup = spec_tps / ar_tps
    return {
        "sampling": {
            "greedy": sampling.greedy,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
        },
        "prompts": len(prompts),
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "ar_tokens_per_s": ar_tps,
        "speculative_tokens_per_s": spec_tps,
        "tokens_per_forward": spec["tokens_per_forward"],
        "acceptance": spec["acceptance"],
        "speedup": speedup,
        "speedup_over_tokens_per_forward": speedup / spec["tokens_per_forward"],
        "ar_seconds": times["ar"],
        "speculative_seconds": times["speculative"],
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
        },
    }
