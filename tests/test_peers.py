"""Naming lost ranks (`cpmtp_dist/parallel/peers.py`) without a cluster: the roll call over a real TCPStore in
this process, the messages of gloo that count as a peer's failure, and the setting that bounds the wait. The
whole path, a node lost mid-run across two simulated Slurm nodes, runs in `tests/test_slurm.py`."""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch.distributed as dist

from cpmtp_dist.config_io import ConfigError, load_config, validate_config
from cpmtp_dist.parallel.peers import Placement, is_peer_failure, lost_ranks_error

TIMED_OUT = (
    "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"
)
RESET = "[gloo/transport/tcp/pair.cc:537] Read error [10.213.7.12]:29312: Connection reset by peer."


def test_gloo_failures_of_a_peer_are_recognised_and_others_are_not():
    assert is_peer_failure(RuntimeError(TIMED_OUT)) and is_peer_failure(RuntimeError(RESET))
    assert not is_peer_failure(RuntimeError("CUDA out of memory"))
    assert not is_peer_failure(ValueError(TIMED_OUT))


@pytest.fixture
def store(monkeypatch):
    server = dist.TCPStore(  # port 0: the store binds a free port itself
        "127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10), wait_for_workers=False
    )
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    return server


def test_the_roll_call_names_the_ranks_that_never_answer(store):
    placement = Placement(("n1", "n1", "n2", "n2"))
    store.set("cpmtp/roll_call/0/1", "1")  # rank 1 has signed in; ranks 2 and 3 never will
    lost = lost_ranks_error(RuntimeError(TIMED_OUT), placement, rank=0, wait_s=0.5)
    assert lost is not None and lost.report  # rank 0 is the lowest that answered: it says so
    assert "rank 0 on node n1: a collective failed ([gloo" in str(lost)
    assert "lost rank(s) 2, 3 on node n2: no answer within 0.5 s (parallel.timeout_s)" in str(lost)
    # Rank 1 reaches the same verdict and stays quiet.
    assert not lost_ranks_error(RuntimeError(RESET), placement, rank=1, wait_s=0.5).report
    # Once everyone answers, nobody was lost: the failure is raised as it is.
    for rank in (2, 3):
        store.set(f"cpmtp/roll_call/0/{rank}", "1")
    assert lost_ranks_error(RuntimeError(TIMED_OUT), placement, rank=0, wait_s=0.5) is None


def test_an_unreachable_store_means_the_first_node_is_lost(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    lost = lost_ranks_error(RuntimeError(RESET), Placement(("n1", "n2")), rank=1, wait_s=1.0)
    assert lost is not None and lost.report
    assert "the rendezvous store on 127.0.0.1 is out of reach: the job's first node (n1) is lost" in str(lost)


def test_the_collective_timeout_must_be_positive():
    with pytest.raises(ConfigError, match=r"parallel.timeout_s=0.0 must be > 0 seconds"):
        validate_config(load_config(None, ["parallel.timeout_s=0"]), world_size=1)
