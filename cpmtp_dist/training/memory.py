"""Peak memory of tensors on a CPU, where no allocator keeps statistics (`train.measure_memory`).

`LiveTensorBytes` is a dispatch mode that sees every tensor an operator creates while it is active and
counts the bytes of each new storage until that storage is freed (a weak-reference callback): `peak` is
the most tensor storage alive at once. Outputs that alias an input (views, in-place and `out=` ops) add
nothing. What it cannot see: storages created before it was entered (the data, unless copied), memory that
libraries allocate outside torch tensors (gloo's buffers), and allocator slack. It slows every operator a
little, which is why it is off by default.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from cpmtp_dist.config import Config
from cpmtp_dist.plan import GIB, estimate, one_line

__all__ = ["LiveTensorBytes", "measured_peak_gib", "print_plan"]


class LiveTensorBytes(TorchDispatchMode):
    """Live tensor-storage bytes (`current`) and their maximum (`peak`) since the mode was entered."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: dict[int, int] = {}  # storage key -> bytes, while alive

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._seen:
            return
        size = storage.nbytes()
        self._seen[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._seen.pop(key, 0)

    def forget(self) -> None:
        """Count only the storages made from now on (the ones alive now are left out, also when freed)."""
        self._seen = dict.fromkeys(self._seen, 0)
        self.current = self.peak = 0

    def reset_peak(self) -> None:
        """Start the peak again from what is alive now."""
        self.peak = self.current


def measured_peak_gib(meter: LiveTensorBytes | None, device: torch.device) -> float:
    """The largest peak of tensor memory over all ranks, in GiB: the allocator's on CUDA, else `meter`'s."""
    if device.type == "cuda":
        peak = torch.tensor([float(torch.cuda.max_memory_allocated(device))], device=device)
    else:
        peak = torch.tensor([float(meter.peak if meter is not None else 0)])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return float(peak) / 2**30


def print_plan(cfg: Config, world_size: int, device: torch.device, *, enabled: bool) -> None:
    """Print `cpmtp plan`'s estimate for this run's layout (rank 0, before the first step), with a warning
    when it exceeds the GPU's memory; a CPU has no such limit to check."""
    if not enabled:
        return
    est = estimate(cfg, world_size, cuda=device.type == "cuda")
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    print(one_line(est, None if total is None else total / GIB), flush=True)
    if total is not None and est.total > total:
        print(
            f"warning: the estimate {est.total / GIB:.1f} GiB per rank exceeds the GPU's {total / GIB:.1f} GiB: "
            "lower train.micro_batch_size, raise parallel.tp or parallel.pp, or use optim.zero_stage=2 "
            "(`cpmtp plan` lists the layouts that fit)",
            flush=True,
        )
