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
    kept, out = multi_draft_accept(log_p, log_q, [token], generator)
    return kept is not None, out


def multi_draft_accept(
    log_p: Tensor, log_q: Tensor, tokens: list[int], generator: torch.Generator | None
) -> tuple[int | None, int]:
    """Recursive rejection sampling of candidates drawn from q one after another *without replacement*
    against the verifier p (both (V,)): (index of the kept candidate or None, the token).

    Candidate i is tested as in `accept_or_resample`, against p_i and q_i: p_1 = p, q_1 = q; after a
    rejection p_{i+1} = normalise(max(0, p_i - q_i)) and q_{i+1} is q_i without the rejected token,
    renormalised (the distribution the next candidate was drawn from). Each test returns a draw of its p_i,
    so the result is distributed as p whatever the candidates (Jeon et al., 2024; one candidate is exactly
    `accept_or_resample`). When all are rejected the token is a draw from the last residual.
    """
    p, q = log_p.exp(), log_q.exp()
    for i, token in enumerate(tokens):
        u = torch.rand((), generator=generator, dtype=p.dtype, device=p.device)
        if u * q[token] <= p[token]:
            return i, token
        residual = (p - q).clamp_min(0)
        total = residual.sum()
        if not total > 0:  # p = q up to rounding, where a rejection has probability 0
            return i, token
        p = residual / total
        q = q.index_fill(0, torch.tensor([token], device=q.device), 0.0)
        left = q.sum()
        if not left > 0:
            break
        q = q / left
    return None, int(torch.multinomial(p, 1, generator=generator))
