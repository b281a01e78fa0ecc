"""Collectives run on their backend's device: CPU tensors under gloo, the current CUDA device under NCCL."""

from __future__ import annotations

import torch
import torch.distributed as dist

from cpmtp_dist.parallel import collectives
from cpmtp_dist.parallel.collectives import all_gather, all_reduce_, backend_device
from cpmtp_dist.parallel.state import initialize_parallel


def test_backend_device_and_in_place_results(monkeypatch):
    groups = initialize_parallel(1, 1, 1, seed=0)  # one gloo process
    assert backend_device() == backend_device(groups.dp_group) == torch.device("cpu")
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_(t, groups.dp_group) is t and t.tolist() == [1.0, 2.0]
    assert [p.tolist() for p in all_gather(t, 1, groups.dp_group)] == [[1.0, 2.0]]
    # Under NCCL the tensor travels to the current CUDA device and the result comes back in place. No GPU
    # here: "cuda" is played by the meta device, and the collective by a stand-in that records its input.
    seen = []
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert backend_device() == torch.device("cuda", 0)
    monkeypatch.setattr(collectives, "backend_device", lambda group=None: torch.device("meta"))
    monkeypatch.setattr(dist, "all_reduce", lambda x, op=None, group=None: seen.append(x.device))
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src: seen.append(src.device) or self)
    host = torch.zeros(3, dtype=torch.float64)
    assert all_reduce_(host) is host
    assert seen == [torch.device("meta"), torch.device("meta")]  # reduced there, copied back from there
