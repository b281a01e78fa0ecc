"""Next-token marginal and n-token drafting from the CP head (docs/MODEL.md, "Drafting n tokens").

The next-token distribution is the exact marginal of the joint:
    P(x_{t+1}) = sum_a w_a P_a^(1)(x_{t+1}).
Exact draws from the joint proceed as a chain: draw x_{t+1} from the marginal, then reweight the
components by what was drawn, pi_a ∝ w_a prod_{j<s} P_a^(j)(x_{t+j}), and draw x_{t+s} from
sum_a pi_a P_a^(s). Greedy drafting takes the argmax at each link of the same chain.

A tree draft (`greedy_tree`, `sampled_tree`) branches after a given first token: its children are the top-k tokens of the
second conditional (greedy) or k draws from it without replacement (sampling), and each child continues its
own chain on its own reweighted gate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cpmtp_dist.model.cp_head import CPHead


def mixture(log_w: Tensor, log_p: Tensor) -> Tensor:
    """log sum_a w_a P_a: log_w (..., r), log_p (..., r, V) -> (..., V)."""
    return torch.logsumexp(log_w.unsqueeze(-1) + log_p, dim=-2)


def first_token_factors(head: CPHead, h: Tensor, shared_unembedding: Tensor | None) -> tuple[Tensor, ...]:
    """The gate's log w (N, r), the first factors log P_a^(1) (N, r, V) and the next-token marginal
    log P(x_{t+1} | h) = logsumexp_a (log w_a + log P_a^(1)) (N, V), fp32, at h (N, d)."""
    log_w = head.gate_log_weights(h)
    first = head.factor_log_probs(h, shared_unembedding, slice(0, 1))[:, :, 0]
    return log_w, first, mixture(log_w, first)


def next_token_log_probs(head: CPHead, h: Tensor, shared_unembedding: Tensor | None) -> Tensor:
    """log P(x_{t+1} | h), fp32.  (N, d) -> (N, V)."""
    return first_token_factors(head, h, shared_unembedding)[2]


@dataclass
class Draft:
    tokens: Tensor  # (N, n) drafted tokens
    log_q: Tensor  # (N, n, V) log of the (transformed) conditional each token was drawn from


@torch.no_grad()
def draft_from_factors(
    log_w: Tensor,
    log_p: Tensor,
    *,
    greedy: bool,
    generator: torch.Generator | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    first: Tensor | None = None,
) -> Draft:
    """The drafting chain from the gate's log-weights `log_w` (N, r) and the factors' log-probabilities
    `log_p` (N, r, n, V).

    `transform` (sampling only) maps each conditional to the distribution actually drawn from
    (temperature, top-k, top-p); the returned `log_q` are the transformed conditionals. `first` (N,)
    fixes the first token instead of drawing it (speculative sampling's correction after a rejection);
    the chain then continues conditioned on it.
    """
    log_pi = log_w  # (N, r): log of the unnormalised reweighted gate
    tokens, log_qs = [], []
    for s in range(log_p.shape[2]):
        comp = log_p[:, :, s]  # (N, r, V)
        log_q = mixture(log_pi - torch.logsumexp(log_pi, dim=-1, keepdim=True), comp)
        if transform is not None:
            log_q = transform(log_q)
        if s == 0 and first is not None:
            x = first
        elif greedy:
            x = log_q.argmax(dim=-1)
        else:
            x = torch.multinomial(log_q.exp(), 1, generator=generator).squeeze(-1)
        log_pi = log_pi + comp.gather(-1, x[:, None, None].expand(-1, comp.shape[1], 1)).squeeze(-1)
        tokens.append(x)
        log_qs.append(log_q)
    return Draft(tokens=torch.stack(tokens, dim=1), log_q=torch.stack(log_qs, dim=1))


@torch.no_grad()
def draft(
    head: CPHead,
    h: Tensor,
    shared_unembedding: Tensor | None,
    *,
    greedy: bool,
    generator: torch.Generator | None = None,
) -> Draft:
    """Draft n tokens from the CP head at positions h: (N, d).

    Returns the tokens and, for speculative sampling, the conditional log q(. | drafted prefix) of
    every position.
    """
    log_p = head.all_factor_log_probs(h, shared_unembedding)
    return draft_from_factors(head.gate_log_weights(h), log_p, greedy=greedy, generator=generator)


def greedy_chain(pi: Tensor, probs: Tensor) -> Tensor:
    """The greedy chain from normalised gate weights `pi` (N, r) over the factors' probabilities `probs`
    (r, S, V) shared by all N rows: tokens (N, S). The argmaxes of `draft_from_factors(greedy=True)` (up to
    rounding in near-ties), computed in probability space without the conditionals' logarithms: the
    decoding path, where a greedy draft's conditionals are never read."""
    tokens = []
    for s in range(probs.shape[1]):
        x = (pi @ probs[:, s]).argmax(dim=-1)  # (N,): the argmax of sum_a pi_a P_a^(s)
        pi = pi * probs[:, s, x].t()  # the argmax keeps at least 1/V of the mixture: no underflow
        pi = pi / pi.sum(dim=-1, keepdim=True)
        tokens.append(x)
    return torch.stack(tokens, dim=1) if tokens else pi.new_zeros(pi.shape[0], 0, dtype=torch.long)


def greedy_tree(pi: Tensor, probs: Tensor, branches: int) -> Tensor:
    """A greedy tree of `branches` chains after a fixed first token x_1 (one branch: the speculative chain):
    tokens (k, D), row b = child b (the b-th most likely second token) and its greedy chain.

    `pi` (r,): the gate's weights reweighted by the first token, ∝ w_a P_a^(1)(x_1), normalised; `probs`
    (r, D, V): the factors of head positions 2 .. D + 1.
    """
    children = (pi @ probs[:, 0]).topk(min(branches, probs.shape[-1])).indices
    pi_k = pi.unsqueeze(0) * probs[:, 0, children].t()  # (k, r)
    rest = greedy_chain(pi_k / pi_k.sum(dim=-1, keepdim=True), probs[:, 1:])
    return torch.cat([children[:, None], rest], dim=1)


@dataclass
class TreeDraft:
    tokens: Tensor  # (k, D): row b = child b of the first token, then its chain
    root_log_q: Tensor  # (V,): the conditional the k children were drawn from
    log_q: Tensor  # (k, D - 1, V): each branch's conditionals after its child


def sampled_tree(
    log_pi: Tensor,
    log_p: Tensor,
    branches: int,
    *,
    generator: torch.Generator | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
) -> TreeDraft:
    """A sampled tree after a fixed first token x_1: k sequential draws without replacement from the second
    conditional (fewer where it has fewer tokens), each continued by sampling its own chain; with the
    (transformed) conditionals that speculative sampling tests against.

    `log_pi` (r,): log w_a + log P_a^(1)(x_1); `log_p` (r, D, V): the factors of head positions 2 .. D + 1.
    """
    r, depth, vocab = log_p.shape
    root_log_q = mixture(log_pi - torch.logsumexp(log_pi, dim=-1), log_p[:, 0])
    if transform is not None:
        root_log_q = transform(root_log_q)
    children = draws_without_replacement(root_log_q, branches, generator)
    k = children.shape[0]
    if depth == 1:
        return TreeDraft(children[:, None], root_log_q, log_p.new_zeros(k, 0, vocab))
    log_pi_k = log_pi.unsqueeze(0) + log_p[:, 0, children].t()  # (k, r)
    rest = log_p[:, 1:].expand(k, r, depth - 1, vocab)
    d = draft_from_factors(log_pi_k, rest, greedy=False, generator=generator, transform=transform)
    return TreeDraft(torch.cat([children[:, None], d.tokens], dim=1), root_log_q, d.log_q)


def draws_without_replacement(log_q: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """k sequential draws from exp(log_q) (V,), each from what is left after removing the earlier ones,
    in draw order (fewer when fewer than k tokens have mass)."""
    q = log_q.exp()
    out = []
    for _ in range(min(k, int((q > 0).sum()))):
        x = torch.multinomial(q, 1, generator=generator)
        out.append(x)
        q = q.index_fill(0, x, 0.0)
    return torch.cat(out)
