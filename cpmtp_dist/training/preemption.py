"""Preemption: SIGTERM or SIGUSR2 (Slurm's warning signal with `--signal=USR2@T`) ends a run at the next step
boundary with a checkpoint, on every rank together.

A handler only sets a flag; every step the ranks all-reduce their flags (with the step's finiteness flags, in
`nonfinite.StepGuard`), so a signal that reaches the ranks at different moments still stops all of them after
the same step. The trainer
then saves a checkpoint and returns; `cpmtp train` exits with `PREEMPTED_EXIT_CODE` so that a job script
can requeue itself, and the requeued run continues with `--resume auto`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import torch

PREEMPTED_EXIT_CODE = 3
"""`cpmtp train`'s exit status after a preemption checkpoint (requeue and resume)."""

SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class PreemptionWatch:
    """Sets a flag on SIGTERM / SIGUSR2 for as long as it is open (a context manager)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionWatch:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
