"""`cpmtp bench decode`: autoregressive vs drafted (self-speculative, or tree) decoding of the same model
and prompts. The result's `speculative_*` entries are those of the drafted mode (`mode`, `branches`).

Batch 1, KV cache in both modes. Every prompt is decoded `repeats` times in each mode, alternating
(A B A B ...) so that drifts of a shared machine hit both alike; a prompt's time in a mode is the median
of its repeats, and each mode's tokens per second is all new tokens over the sum of those medians. In
greedy mode the two outputs must be equal token for token in fp32 (checked: a difference fails the
benchmark). In bf16 a near-tie can round differently in a 1-token and a k-token forward, so there the
benchmark reports each prompt's first position where the outputs differ (`greedy_first_divergence`, None
where they agree) instead of failing.
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
    mode: str = "speculative",
    branches: int = 2,
) -> dict:
    if mode == "ar":
        raise ValueError("--mode ar: the benchmark compares a drafted mode (speculative, tree) with ar")
    modes = {"ar": "ar", "speculative": mode}
    warm = min(8, max_new_tokens)
    decoder.generate(prompts[0], warm, mode=mode, branches=branches, sampling=sampling)  # warm-up
    times: dict[str, list[float]] = {"ar": [], "speculative": []}
    stats: dict[str, list] = {"ar": [], "speculative": []}
    tokens = {"ar": 0, "speculative": 0}
    exact = decoder.dtype in (torch.float32, torch.float64)
    divergence: list[int | None] = []
    for i, prompt in enumerate(prompts):
        per_mode: dict[str, list[float]] = {"ar": [], "speculative": []}
        outputs: dict[str, list[int]] = {}
        for rep in range(repeats):
            for key, how in modes.items():
                out = decoder.generate(
                    prompt, max_new_tokens, mode=how, branches=branches, sampling=sampling, eos_id=eos_id,
                    seed=1000 * i + rep,
                )  # fmt: skip
                per_mode[key].append(out.stats.seconds)
                if rep == 0:
                    stats[key].append(out.stats)
                    tokens[key] += out.stats.new_tokens
                    outputs[key] = out.tokens
        if sampling.greedy:
            divergence.append(first_difference(outputs["ar"], outputs["speculative"]))
            if exact and divergence[-1] is not None:
                raise AssertionError(
                    f"prompt {i}: greedy {mode} output differs from greedy autoregressive at new token "
                    f"{divergence[-1]} ({decoder.dtype})"
                )
        for key in times:
            times[key].append(statistics.median(per_mode[key]))
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
        "mode": mode,
        **({"branches": branches, "kept_branch": spec["kept_branch"]} if mode == "tree" else {}),
        "prompts": len(prompts),
        "device": str(decoder.device),
        "dtype": str(decoder.dtype).removeprefix("torch."),
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
        **({"greedy_first_divergence": divergence} if sampling.greedy else {}),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads(),
        },
    }


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where the token lists differ (a length difference counts), or None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
