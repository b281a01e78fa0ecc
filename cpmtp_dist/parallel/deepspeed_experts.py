"""Telling DeepSpeed which parameters are CP components sharded over the expert-parallel group.

Note: DeepSpeed (0.19) treats a parameter as an expert when `param.allreduce is False`; it then
reduces its gradient over the expert-data-parallel group registered under `param.group_name` and
partitions its ZeRO state over that group. Without this it would broadcast rank 0's components to
every rank at start-up and average component gradients over all of dp. Two further conditions:
- the engine turns its expert code paths on only if some module is a `deepspeed.moe.layer.MoE`; a
  parameter-free subclass attached to the model does that (`num_local_experts = 0` keeps DeepSpeed's
  per-expert checkpoint files, which assume its own MoE layer's parameter names, empty);
- optimizer parameter groups must be split into expert and non-expert groups
  (`split_params_into_different_moe_groups_for_optimizer`, see `training/optim.py`).
DeepSpeed sums component gradients over the expert-dp group and divides by the whole dp size, which is
exactly the gradient of the global loss given the trainer's loss scaling (dp / global count).
With ZeRO-0 DeepSpeed's gradient clipping averages per-rank norms instead of summing squares over the
ep group, so expert parallelism requires ZeRO stage >= 1 (validated in the config).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn

from cpmtp_dist.parallel.heavy_imports import import_deepspeed
from cpmtp_dist.parallel.state import ParallelGroups


def expert_group_name(groups: ParallelGroups) -> str:
    return f"ep_size_{groups.ep_size}"


def apply_deepspeed_expert_parallel(model: nn.Module, groups: ParallelGroups) -> None:
    """Mark the model's `expert_parallel` parameters for DeepSpeed and register our groups; no-op at ep = 1."""
    if groups.ep_size == 1:
        return
    import_deepspeed()
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import groups as ds_groups

    name = expert_group_name(groups)
    for p in model.parameters():
        if getattr(p, "expert_parallel", False):
            p.allreduce = False
            p.group_name = name
    ds_groups._EXPERT_PARALLEL_GROUP[name] = groups.ep_group
    ds_groups._EXPERT_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(groups.ep_group)
    ds_groups._EXPERT_DATA_PARALLEL_GROUP[name] = groups.expert_dp_group
    ds_groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = dist.get_process_group_ranks(groups.expert_dp_group)

    class ExpertParallelMarker(MoE):
        """Parameter-free: its only job is to make the DeepSpeed engine enable its expert paths."""

        def __init__(self) -> None:
            nn.Module.__init__(self)
            self.num_experts, self.ep_size, self.expert_group_name = groups.ep_size, groups.ep_size, name
            self.num_local_experts = 0
            self.use_residual = False
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # our groups are registered above

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-parallel marker is not a layer")

    model.add_module("deepspeed_expert_marker", ExpertParallelMarker())
