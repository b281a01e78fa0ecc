"""Sampling settings and the one transform of a distribution that decoding applies everywhere.

Temperature, then top-k, then top-p (nucleus) are applied to log-probabilities in that order; the result
is renormalised. Speculative sampling applies the same transform to the draft's conditionals and to the
verifier's distributions, so its output has the distribution of plain sampling with these settings.
Greedy decoding ignores all three (none of them moves the argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Sampling:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self) -> None:
        problems = []
        if not self.temperature > 0:
            problems.append(f"--temperature {self.temperature}: must be > 0 (use --greedy for argmax)")
        if self.top_k < 0:
            problems.append(f"--top-k {self.top_k}: must be >= 0 (0 turns it off)")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p {self.top_p}: must be in (0, 1] (1 turns it off)")
        if problems:
            raise ValueError("; ".join(problems))

    def transform(self, log_p: Tensor) -> Tensor:
        """Normalised log-probabilities (..., V) after temperature, top-k and top-p."""
        log_p = torch.log_softmax(log_p / self.temperature, dim=-1)
        if 0 < self.top_k < log_p.shape[-1]:
            kth = log_p.topk(self.top_k, dim=-1).values[..., -1:]
            log_p = log_p.masked_fill(log_p < kth, float("-inf"))
        if self.top_p < 1:
            sorted_lp, order = log_p.sort(dim=-1, descending=True)
            before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # mass strictly above each token
            drop_sorted = before >= self.top_p  # keeps the smallest prefix reaching top_p (at least one)
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            log_p = log_p.masked_fill(drop, float("-inf"))
        return torch.log_softmax(log_p, dim=-1)

    def pick(self, log_p: Tensor, generator: torch.Generator | None) -> int:
        """The next token from a distribution over V (already transformed when sampling)."""
        if self.greedy:
            return int(log_p.argmax())
        return int(torch.multinomial(log_p.exp(), 1, generator=generator))


def accept_or_resample(
    log_p: Tensor, log_q: Tensor, token: int, generator: torch.Generator | None
) -> tuple[bool, int]:
    """One speculative-sampling test of a draft token drawn from q against the verifier p (both (V,)).

    Accept with probability min(1, p(x) / q(x)); otherwise return a draw from normalise(max(0, p - q)).
    Either way the returned token is distributed as p (Leviathan et al., 2023).
    """
    p, q = log_p.exp(), log_q.exp()
    u = torch.rand((), generator=generator, dtype=p.dtype, device=p.device)
    if u * q[token] <= p[token]:
        return True, token
    residual = (p - q).clamp_min(0)
    return False, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
