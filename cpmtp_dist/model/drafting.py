"""Next-token marginal and n-token drafting from the CP head (SPEC.md, "Drafting n tokens").

The next-token distribution is the exact marginal of the joint:
    P(x_{t+1}) = sum_a w_a P_a^(1)(x_{t+1}).
Exact draws from the joint proceed as a chain: draw x_{t+1} from the marginal, then reweight the
components by what was drawn, pi_a ∝ w_a prod_{j<s} P_a^(j)(x_{t+j}), and draw x_{t+s} from
sum_a pi_a P_a^(s). Greedy drafting takes the argmax at each link of the same chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cpmtp_dist.model.cp_head import CPHead, upcast


def next_token_log_probs(head: CPHead, h: Tensor, shared_unembedding: Tensor | None) -> Tensor:
    """log P(x_{t+1} | h) = logsumexp_a (log w_a + log P_a^(1)), fp32.  (N, d) -> (N, V)."""
    log_w = head.gate_log_weights(h)  # (N, r)
    per_comp = torch.stack(
        [
            F.log_softmax(upcast(head.factor_logits(h, a, 0, shared_unembedding)), dim=-1)
            for a in range(head.num_local_components)
        ],
        dim=1,
    )  # (N, r, V)
    return torch.logsumexp(log_w.unsqueeze(-1) + per_comp, dim=1)


@dataclass
class Draft:
    tokens: Tensor  # (N, n) drafted tokens
    log_q: Tensor  # (N, n, V) log of the conditional each token was drawn from


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
    log_pi = head.gate_log_weights(h)  # (N, r): log of the unnormalised reweighted gate
    tokens, log_qs = [], []
    for s in range(head.horizon):
        comp = torch.stack(
            [
                F.log_softmax(upcast(head.factor_logits(h, a, s, shared_unembedding)), dim=-1)
                for a in range(head.num_local_components)
            ],
            dim=1,
        )  # (N, r, V)
        post = log_pi - torch.logsumexp(log_pi, dim=-1, keepdim=True)  # (N, r) normalised pi
        log_q = torch.logsumexp(post.unsqueeze(-1) + comp, dim=1)  # (N, V)
        if greedy:
            x = log_q.argmax(dim=-1)
        else:
            x = torch.multinomial(log_q.exp(), 1, generator=generator).squeeze(-1)
        log_pi = log_pi + comp.gather(-1, x[:, None, None].expand(-1, comp.shape[1], 1)).squeeze(-1)
        tokens.append(x)
        log_qs.append(log_q)
    return Draft(tokens=torch.stack(tokens, dim=1), log_q=torch.stack(log_qs, dim=1))
