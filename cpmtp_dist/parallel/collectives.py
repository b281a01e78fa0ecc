"""The collectives the project calls, each run on the device its process group's backend works on.

NCCL only takes CUDA tensors (of the current device); gloo takes CPU tensors. Statistics such as a parameter
count or a gradient norm are naturally built on the host, and model tensors on the model's device, so every
collective goes through here: the tensor is moved to the backend's device when it is not already there, and
the result comes back to the tensor's own device. Tensors already in the right place cost nothing extra.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def backend_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a collective of `group` (None: the default group) runs: the current CUDA device for NCCL, else
    the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(
    tensor: Tensor, group: dist.ProcessGroup | None = None, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM
) -> Tensor:
    """All-reduce `tensor` in place (on its own device, whatever the backend's) and return it."""
    device = backend_device(group)
    if tensor.device == device:
        dist.all_reduce(tensor, op=op, group=group)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op, group=group)
    return tensor.copy_(moved)


def all_gather(tensor: Tensor, world: int, group: dist.ProcessGroup | None = None) -> list[Tensor]:
    """Every rank's `tensor` (same shape on all), in rank order, on `tensor`'s device."""
    device = backend_device(group)
    local = tensor.contiguous().to(device)
    parts = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(parts, local, group=group)
    return [p.to(tensor.device) for p in parts]
