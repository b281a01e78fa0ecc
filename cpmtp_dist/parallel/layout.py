"""What the rest of the code needs from a parallel layout: the vocabulary shard of this rank, the
`mpu` view DeepSpeed expects, gradient norms and parameter counts of the whole model.

Everything here takes the `ParallelGroups` built by `state.initialize_parallel`; nothing looks the
groups up by itself.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from cpmtp_dist.parallel.collectives import all_reduce_
from cpmtp_dist.parallel.experts import ExpertShard
from cpmtp_dist.parallel.state import ParallelGroups
from cpmtp_dist.parallel.vocab import VocabShard


def build_expert_shard(groups: ParallelGroups, rank: int) -> ExpertShard:
    """This rank's CP components: r / ep consecutive ones, by position in the ep group."""
    if groups.ep_size == 1:
        return ExpertShard()
    r_local = rank // groups.ep_size
    return ExpertShard(
        group=groups.ep_group, world=groups.ep_size, rank=groups.ep_rank, start=groups.ep_rank * r_local
    )


def build_vocab_shard(groups: ParallelGroups, vocab_size: int) -> VocabShard:
    """This rank's slice of the vocabulary: Megatron splits embeddings evenly over the tp ranks."""
    if groups.tp_size == 1:
        return VocabShard()
    return VocabShard(
        group=groups.tp_group, world=groups.tp_size, start=groups.tp_rank * vocab_size // groups.tp_size
    )


class DeepSpeedMPU:
    """The model-parallel unit DeepSpeed asks for (`deepspeed.initialize(mpu=...)`).

    Note: DeepSpeed averages gradients over `get_data_parallel_group()` and sums gradient norms over
    `get_model_parallel_group()`, counting a parameter on every model-parallel rank if it carries
    `tensor_model_parallel=True` (it is split) and on model-parallel rank 0 only otherwise (it is
    replicated). Megatron marks its split weights that way; the CP head marks its own.
    """

    def __init__(self, groups: ParallelGroups) -> None:
        self.g = groups

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.g.mp_group

    def get_model_parallel_rank(self) -> int:
        return self.g.mp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.g.tp_size * self.g.pp_size

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.g.tp_group

    def get_tensor_model_parallel_rank(self) -> int:
        return self.g.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.g.tp_size

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self.g.pp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self.g.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.g.pp_size

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.g.dp_group

    def get_data_parallel_rank(self) -> int:
        return self.g.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.g.dp_size

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.g.dp_group)


@torch.no_grad()
def global_grad_norm(model: nn.Module, groups: ParallelGroups) -> float:
    """L2 norm of the whole model's gradient, each parameter counted once across model-parallel ranks
    (split parameters on every rank, replicated ones on model-parallel rank 0), as DeepSpeed counts."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is not None and (getattr(p, "tensor_model_parallel", False) or groups.mp_rank == 0):
            sq += p.grad.detach().double().pow(2).sum().cpu()
    if groups.tp_size * groups.pp_size > 1:
        all_reduce_(sq, groups.mp_group)
    return float(sq.sqrt())


def count_parameters(model: nn.Module, groups: ParallelGroups) -> int:
    """Parameters of the whole (unsharded) model, from this rank's part. Collective over pp."""
    total = 0
    for p in model.parameters():
        if getattr(p, "ds_pipe_replicated", False):
            continue  # the last stage's copy of the tied embedding
        n = p.numel()
        n *= groups.tp_size if getattr(p, "tensor_model_parallel", False) else 1
        n *= groups.ep_size if getattr(p, "expert_parallel", False) else 1
        total += n
    if groups.pp_size > 1:
        total = int(all_reduce_(torch.tensor(total, dtype=torch.int64), groups.pp_group))
    return total
