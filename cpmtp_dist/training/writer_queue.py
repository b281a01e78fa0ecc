"""The checkpoint writer's results queue, held by a manager process that outlives the job's stop signals.

Note: Megatron's torch_dist writer reports each save's results through a queue of a `multiprocessing`
manager, a process it spawns at the first save. A preemption signal reaches every process of the job
(Slurm, `kill -TERM -PGID`, Ctrl-C): a manager of its own dies with it, and the checkpoint that the signal
asks for then fails with a broken pipe. The manager started here ignores SIGTERM, SIGINT and SIGUSR2
and, on Linux, is killed when the trainer dies, so it never outlives the run. It is forked (not spawned:
a spawned process would import the caller's main module, which a script that calls `train()` need not
guard), early, while the trainer is still small.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from multiprocessing.managers import SyncManager
from queue import Queue

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1


def _shield(parent: int) -> None:
    """Runs in the manager process, before it serves."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the trainer died before the request took effect
            os._exit(1)


def start_results_queue() -> Queue:
    """A queue proxy of a new shielded manager (the proxy keeps the manager alive)."""
    manager = SyncManager(ctx=mp.get_context("fork"))
    manager.start(initializer=_shield, initargs=(os.getpid(),))
    return manager.Queue()
