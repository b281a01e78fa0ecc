"""Expert parallelism of the CP components: which components live here, and the collectives the CP
loss needs over the expert-parallel group.

The ep group is carved out of the data-parallel ranks, so its members hold different components *and*
different tokens. Every position needs every component, so the loss gathers the trunk outputs of the
group (O(tokens * d)), each rank scores its own components on all of them, and the per-component sums
are gathered (O(tokens * r)). The gradient of the gathered trunk outputs is summed back to the owners
(O(tokens * d)). No logits cross ranks.

`ExpertShard()` (one rank, all components) does no communication.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from cpmtp_dist.parallel.collectives import all_gather, all_reduce_


@dataclass(frozen=True)
class ExpertShard:
    """Components [start, start + r_local) live on this rank; `group` holds the others."""

    group: dist.ProcessGroup | None = None
    world: int = 1
    rank: int = 0
    start: int = 0

    def own_rows(self, n_own: int) -> slice:
        """This rank's rows within a tensor gathered with `gather_rows`."""
        return slice(self.rank * n_own, (self.rank + 1) * n_own)

    def gather_rows(self, x: Tensor) -> Tensor:
        """Concatenate `x` of every rank along dim 0, in rank order.  (N, ...) -> (world * N, ...)."""
        return self._gather(x, dim=0)

    def gather_cols(self, x: Tensor) -> Tensor:
        """Concatenate `x` of every rank along dim 1 (the component dimension)."""
        return self._gather(x, dim=1)

    def _gather(self, x: Tensor, dim: int) -> Tensor:
        if self.world == 1:
            return x
        return torch.cat(all_gather(x, self.world, self.group), dim=dim)

    def sum_to_owner(self, x: Tensor, n_own: int) -> Tensor:
        """Sum `x` (world * N, ...) over the group and keep this rank's rows.  -> (N, ...)."""
        if self.world == 1:
            return x
        x = all_reduce_(x.contiguous(), self.group)
        return x[self.own_rows(n_own)]

    def all_reduce_(self, x: Tensor) -> Tensor:
        if self.world > 1:
            all_reduce_(x, self.group)
        return x


LOCAL_EXPERTS = ExpertShard()
"""All components on one rank."""
