"""When ranks are lost: which ones, said by the survivors, within a bounded time.

A node that dies (or a rank that crashes or hangs) leaves its peers waiting in a collective. Every process
group fails a collective after `parallel.timeout_s` without its peers (`parallel/state.py`), or at once when
the peer's connection closes. The trainer then calls `lost_ranks_error`: each surviving rank signs in to the
job's rendezvous store (a roll call) and waits until every rank has signed in or `parallel.timeout_s` has
passed (a survivor still blocked in another collective fails within that time too); the ranks that never
sign in are the lost ones. The error names them and their nodes, and `cpmtp train` exits with
`PEERS_LOST_EXIT_CODE`: a distinct status for launchers and job scripts (`slurm/train.sbatch` then continues
the run on the nodes that are left, from the newest checkpoint).

Note: this covers gloo, where a failed collective raises. Under NCCL a timed-out collective ends the process
(torch's watchdog), without the roll call: the launcher sees the ranks' failure and, on Slurm, the job
script the node that stopped answering.
"""

from __future__ import annotations

import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

PEERS_LOST_EXIT_CODE = 5

# What gloo says when a peer's connection closes or a collective waits too long (pair.cc, unbound_buffer.cc).
_PEER_FAILURE = re.compile(r"Connection (reset|closed|refused)|Broken pipe|[Tt]imed out")


class PeersLost(RuntimeError):
    """Some ranks stopped answering: the message names them. `report`: this rank is the one that says so
    (the lowest that answered the roll call; every survivor when there was no roll call)."""

    def __init__(self, message: str, report: bool = True) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Placement:
    """Where each rank of the job runs: `nodes[rank]` (the Slurm node name, else the host name)."""

    nodes: tuple[str, ...]

    @classmethod
    def gather(cls) -> Placement:
        """Every rank's node; a collective, called once while every rank is alive."""
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        nodes: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(nodes, node)
        return cls(tuple(str(n) for n in nodes))

    def describe(self, ranks: list[int]) -> str:
        by_node: dict[str, list[int]] = {}
        for r in ranks:
            by_node.setdefault(self.nodes[r], []).append(r)
        return "; ".join(f"rank(s) {', '.join(map(str, rs))} on node {n}" for n, rs in by_node.items())


def is_peer_failure(err: BaseException) -> bool:
    """Whether `err` (raised by a collective) says that a peer closed its connection or did not answer."""
    return isinstance(err, RuntimeError) and bool(_PEER_FAILURE.search(str(err)))


def roll_call(rank: int, world: int, wait_s: float) -> list[int] | None:
    """Sign in to the rendezvous store and wait (at most `wait_s`) for the other ranks; the ranks that signed
    in, or None when the store itself is out of reach (its host, the job's first node, is lost)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr is None or port is None:
        return None
    prefix = f"cpmtp/roll_call/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = dist.TCPStore(
            addr,
            int(port),
            is_master=False,
            timeout=timedelta(seconds=max(wait_s, 1.0)),
            wait_for_workers=False,
        )
        store.set(f"{prefix}/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            present = [r for r in range(world) if store.check([f"{prefix}/{r}"])]
            if len(present) == world or time.monotonic() > deadline:
                return present
            time.sleep(0.2)
    except (RuntimeError, OSError):  # DistStoreError and connection failures alike
        return None


def lost_ranks_error(err: RuntimeError, placement: Placement, rank: int, wait_s: float) -> PeersLost | None:
    """After collective failure `err`: the roll call's verdict as a `PeersLost` to raise, or None when every
    rank answered (the failure is something else, to be raised as it is)."""
    world = len(placement.nodes)
    present = roll_call(rank, world, wait_s)
    first_line = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    if present is not None and len(present) == world:
        return None
    if present is None:
        head = os.environ.get("MASTER_ADDR", "?")
        who = f"the rendezvous store on {head} is out of reach: the job's first node ({placement.nodes[0]}) is lost"
    else:
        lost = [r for r in range(world) if r not in present]
        who = f"lost {placement.describe(lost)}: no answer within {wait_s:g} s (parallel.timeout_s)"
    return PeersLost(
        f"rank {rank} on node {placement.nodes[rank]}: a collective failed ({first_line}); {who}. Continue "
        "the run with --resume auto on the nodes that are left (the data-parallel size may shrink)",
        report=present is None or rank == min(present),
    )
