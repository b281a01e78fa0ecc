"""Vocabulary-parallel reductions for the CP loss under tensor parallelism.

Under tp > 1 every unembedding (the tied `U`, or `U_a^(s)` under `separate`) is split over the
vocabulary: rank k holds rows [k V/tp, (k+1) V/tp) and computes only those logits. The CP loss needs
three global quantities per factor and position, each one all-reduce of O(rows) numbers: the
log-normaliser, the target logit, and (for accuracy) the argmax. The gradient of the features that
feed the unembedding is a partial sum on each rank; what is computed from it (the gradients of h and
of the phi maps) is linear in it, so the loss sums those over the shards once per step: O(tokens * d)
plus the size of phi. Logits themselves never cross ranks.

`VocabShard()` (one rank, the whole vocabulary) does no communication, so the loss code is the same
on one device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from cpmtp_dist.parallel.collectives import all_reduce_


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice [start, start + V_local) of the vocabulary, and the group holding the rest."""

    group: dist.ProcessGroup | None = None
    world: int = 1
    start: int = 0

    def _all_reduce(self, t: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
        if self.world > 1:
            all_reduce_(t, self.group, op)
        return t

    def logsumexp(self, logits: Tensor) -> Tensor:
        """log sum_v exp(logits[:, v]) over the global vocabulary.  (rows, V_local) -> (rows,)."""
        if self.world == 1:
            return torch.logsumexp(logits, dim=-1)
        m = self._all_reduce(logits.max(dim=-1).values, dist.ReduceOp.MAX)  # (rows,)
        se = self._all_reduce((logits - m.unsqueeze(-1)).exp().sum(dim=-1))
        return m + se.log()

    def _local(self, target: Tensor, v_local: int) -> tuple[Tensor, Tensor]:
        local = target - self.start
        inside = (local >= 0) & (local < v_local)
        return local.clamp(0, v_local - 1), inside

    def target_logit(self, logits: Tensor, target: Tensor) -> Tensor:
        """logits[row, target[row]] wherever the target lives.  (rows, V_local), (rows,) -> (rows,)."""
        local, inside = self._local(target, logits.shape[-1])
        picked = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1) * inside
        return self._all_reduce(picked)

    def subtract_onehot_(self, probs: Tensor, target: Tensor) -> Tensor:
        """probs[row, target[row]] -= 1 on the rank that holds the target: softmax - onehot, in place."""
        local, inside = self._local(target, probs.shape[-1])
        return probs.scatter_add_(-1, local.unsqueeze(-1), -inside.to(probs.dtype).unsqueeze(-1))

    def argmax(self, values: Tensor) -> Tensor:
        """Global vocabulary id of the row-wise maximum.  (rows, V_local) -> (rows,) int64."""
        best, idx = values.max(dim=-1)
        if self.world == 1:
            return idx
        top = self._all_reduce(best.clone(), dist.ReduceOp.MAX)
        # The lowest global id among the ranks that reach the maximum, as torch.argmax would pick.
        big = torch.iinfo(torch.int64).max
        cand = torch.where(best == top, idx + self.start, torch.full_like(idx, big))
        return self._all_reduce(cand, dist.ReduceOp.MIN)

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum a partial result (e.g. the gradient of the features) over the vocabulary shards."""
        return self._all_reduce(t)


LOCAL = VocabShard()
"""The whole vocabulary on one rank."""
