"""Decoding one sequence with a KV cache: plain autoregressive, or self-speculative (docs/MODEL.md).

Both modes run the same loop. Each step has a *first* token (from the model's own next-token
distribution at the last accepted position, or the correction of the previous step's rejection) and,
in speculative mode, n - 1 more drafted by the CP head's chain. The trunk runs once over the k step
tokens, which gives the verifier's next-token distribution after each; draft token s + 1 is kept while
it passes its test against the verifier after token s (greedy: equal to its argmax; sampling:
accept with probability min(1, p/q), else draw the correction from normalise(max(0, p - q))). The KV
cache is rolled back to the accepted prefix and the next step starts from the last accepted position.
Autoregressive mode is the same loop with k = 1.

Context window: the cache holds at most `capacity` positions (the trunk's trained sequence length by
default). When it is full, it is refilled with the last capacity / 2 tokens and decoding continues; a
step never verifies past the end of the window. The window therefore depends only on the absolute
position of a token, in both modes, which keeps greedy speculative decoding identical to greedy
autoregressive decoding for outputs of any length.

Counts: a *forward* is one trunk call after the prompt's prefill (window refills are counted apart);
tokens per forward is the accepted tokens per forward (1 in autoregressive mode, at most n). The last
token of an output is taken from the last forward's distribution without a forward of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cpmtp_dist.inference.kv_cache import KVCache
from cpmtp_dist.inference.sampling import Sampling, accept_or_resample
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.model.drafting import draft_from_factors, first_token_factors

MODES = ("ar", "speculative")


@dataclass
class DecodeStats:
    mode: str
    horizon: int
    new_tokens: int = 0
    forwards: int = 0
    accepted: int = 0
    refills: int = 0
    seconds: float = 0.0
    tested: list[int] = field(default_factory=list)  # per head position s: steps that tested draft s
    passed: list[int] = field(default_factory=list)  # ... and kept it

    @property
    def tokens_per_forward(self) -> float:
        return self.accepted / self.forwards if self.forwards else float("nan")

    @property
    def acceptance(self) -> list[float]:
        """Share of the tested drafts kept, per head position (position 1 is always kept)."""
        return [p / t if t else float("nan") for p, t in zip(self.passed, self.tested, strict=True)]

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "new_tokens": self.new_tokens,
            "forwards": self.forwards,
            "accepted": self.accepted,
            "tokens_per_forward": self.tokens_per_forward,
            "acceptance": self.acceptance,
            "tested": self.tested,
            "passed": self.passed,
            "refills": self.refills,
            "seconds": self.seconds,
        }


@dataclass
class Decoded:
    tokens: list[int]  # the new tokens only
    stats: DecodeStats


class Decoder:
    """Decodes with one model in one process (tp = pp = ep = 1), batch 1."""

    def __init__(self, model: CPModel, capacity: int | None = None) -> None:
        model._single_device()
        if model.head is None:
            raise ValueError("the model has no CP head")
        self.model = model
        self.device = next(model.parameters()).device  # token tensors and generators live there too
        self.dtype = next(model.parameters()).dtype
        self.head = model.head
        self.horizon = model.head.horizon
        self.capacity = capacity or model.cfg.trunk.seq_length
        if self.capacity < 2:
            raise ValueError(f"a decoding window of {self.capacity} positions is too short")
        self.cache = KVCache(model.trunk, self.capacity)

    def _first_factors(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Gate log-weights (k, r), first factors (k, r, V) and next-token log-marginal (k, V) at h (k, d)."""
        return first_token_factors(self.head, h, self.model.unembedding())

    def _tokens(self, ids: list[int]) -> Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _refill(self, ids: list[int], stats: DecodeStats) -> None:
        keep = ids[-max(1, self.capacity // 2) :]
        self.cache.reset()
        self.cache.extend(self._tokens(keep))
        stats.refills += 1

    @torch.inference_mode()
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        *,
        mode: str = "ar",
        sampling: Sampling | None = None,
        eos_id: int | None = None,
        seed: int = 0,
    ) -> Decoded:
        if mode not in MODES:
            raise ValueError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
        if not prompt:
            raise ValueError("the prompt encodes to no tokens: give a non-empty prompt")
        sampling = sampling or Sampling()
        greedy = sampling.greedy
        transform = None if greedy else sampling.transform
        gen = None if greedy else torch.Generator(device=self.device).manual_seed(seed)
        n = self.horizon if mode == "speculative" else 1
        stats = DecodeStats(mode=mode, horizon=n, tested=[0] * n, passed=[0] * n)
        start = time.perf_counter()

        ids = list(prompt)
        self.cache.reset()
        h = self.cache.extend(self._tokens(ids[-self.capacity :]))[-1:]
        log_w, first_factors, marginal = self._first_factors(h)
        forced: Tensor | None = None
        out: list[int] = []
        while len(out) < max_new_tokens:
            remaining = max_new_tokens - len(out)
            if n == 1:
                log_q = marginal if transform is None else transform(marginal)
                step = [forced.item() if forced is not None else sampling.pick(log_q[0], gen)]
                draft_log_q = None
            else:
                rest = self.head.factor_log_probs(h, self.model.unembedding(), slice(1, min(n, remaining)))
                d = draft_from_factors(
                    log_w,
                    torch.cat([first_factors.unsqueeze(2), rest], dim=2),
                    greedy=greedy,
                    generator=gen,
                    transform=transform,
                    first=forced,
                )
                step, draft_log_q = d.tokens[0].tolist(), d.log_q[0]
            forced = None
            if step[0] == eos_id:
                break
            if remaining == 1:
                out.append(step[0])
                break
            if self.cache.length == self.capacity:
                self._refill(ids, stats)
            k = min(len(step), remaining, self.capacity - self.cache.length)
            base = self.cache.length
            hs = self.cache.extend(self._tokens(step[:k]))
            stats.forwards += 1
            log_w_k, first_k, marginal_k = self._first_factors(hs)
            kept = 1
            stats.tested[0] += 1
            stats.passed[0] += 1
            for i in range(k - 1):  # draft token i + 1 against the verifier after token i
                stats.tested[i + 1] += 1
                if greedy:
                    ok = int(marginal_k[i].argmax()) == step[i + 1]
                else:
                    ok, token = accept_or_resample(
                        transform(marginal_k[i]), draft_log_q[i + 1], step[i + 1], gen
                    )
                    if not ok:
                        forced = self._tokens([token])
                if not ok:
                    break
                kept += 1
                stats.passed[i + 1] += 1
            accepted = step[:kept]
            stats.accepted += kept
            if eos_id in accepted:
                out.extend(accepted[: accepted.index(eos_id)])
                break
            out.extend(accepted)
            ids.extend(accepted)
            self.cache.rollback(base + kept)
            h = hs[kept - 1 : kept]
            log_w, first_factors, marginal = (
                log_w_k[kept - 1 : kept],
                first_k[kept - 1 : kept],
                marginal_k[kept - 1 : kept],
            )
        stats.new_tokens = len(out)
        stats.seconds = time.perf_counter() - start
        return Decoded(out, stats)
