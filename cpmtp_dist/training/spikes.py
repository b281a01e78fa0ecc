"""Loss spikes (`train.spike_rewind`): detect them, and say when to rewind to the newest healthy checkpoint.

A step's loss spikes when it exceeds the running mean of the losses before it by more than
`train.spike_sigmas` running standard deviations; the running statistics are those of the last
`train.spike_window` steps that did not spike (a full window is needed before anything is called a spike).
`train.spike_steps` spiking steps in a row confirm a spike: the trainer then reloads the newest healthy
checkpoint saved before the spike's first step, deletes the newer checkpoints (they hold the spike's
states), and goes on with the batches that follow the spike: the batches between the checkpoint and the
spike are skipped, as PaLM and OPT did by hand. The loss every rank sees is the step's mean joint loss from
the step's one exchange (`nonfinite.StepGuard`): detecting costs no synchronisation of its own.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spike:
    """A confirmed spike: its first and last step, the last step's loss, and the running statistics."""

    first_step: int
    step: int
    loss: float
    mean: float
    std: float


class SpikeWatch:
    """The running loss statistics of `train.spike_*`, and the count of rewinds (`train.spike_max_rewinds`)."""

    def __init__(self, sigmas: float, steps: int, window: int, max_rewinds: int) -> None:
        self.sigmas, self.steps, self.max_rewinds = sigmas, steps, max_rewinds
        self.history: deque[float] = deque(maxlen=window)
        self.spiking: list[tuple[int, float]] = []  # the current run of spiking steps
        self.rewinds = 0

    def stats(self) -> tuple[float, float]:
        """The running mean and standard deviation (the latter at least 1e-6)."""
        return statistics.fmean(self.history), max(statistics.pstdev(self.history), 1e-6)

    def observe(self, step: int, loss: float) -> Spike | None:
        """Record step `step`'s mean loss (not finite: ignored, `train.on_nonfinite` handles it); the spike
        when this step confirms one."""
        if not math.isfinite(loss):
            return None
        if len(self.history) == self.history.maxlen:
            mean, std = self.stats()
            if loss > mean + self.sigmas * std:
                self.spiking.append((step, loss))
                if len(self.spiking) < self.steps:
                    return None
                first = self.spiking[0][0]
                self.spiking = []
                return Spike(first, step, loss, mean, std)
        self.spiking = []
        self.history.append(loss)
        return None

    def metrics(self) -> dict[str, float]:
        """The running statistics for a logged row (`spike_mean`, `spike_std`), from 2 steps on: what the
        next step's loss is compared with, to tune `train.spike_sigmas` by."""
        if len(self.history) < 2:
            return {}
        mean, std = self.stats()
        return {"spike_mean": mean, "spike_std": std}

    def event(self, spike: Spike, rewound_to: int | None, discarded: list[str]) -> dict[str, Any]:
        """The event row of metrics.jsonl for `spike` (rewound to step `rewound_to`, or not at all)."""
        row: dict[str, Any] = {
            "event": "spike_rewind" if rewound_to is not None else "spike_not_rewound",
            "spike_first_step": spike.first_step,
            "spike_loss": spike.loss,
            "spike_running_mean": spike.mean,
            "spike_running_std": spike.std,
            "spike_rewinds": self.rewinds,
        }
        if rewound_to is not None:
            row |= {
                "rewound_to": rewound_to,
                "skipped_steps_of_data": spike.step - rewound_to,
                "discarded_checkpoints": discarded,
            }
        return row

    def stop_message(self, spike: Spike, lr: float) -> str:
        """Why training stops: the rewinds did not cure the spikes."""
        return (
            f"step {spike.step}: the loss {spike.loss:.4f} exceeds its running mean {spike.mean:.4f} by more than "
            f"{self.sigmas:g} standard deviations ({spike.std:.4f}) since step {spike.first_step}, after "
            f"{self.rewinds} rewinds (train.spike_max_rewinds={self.max_rewinds}); training stopped. Try a lower "
            f"optim.lr (now {lr:g}), a longer optim.warmup_steps or a smaller optim.grad_clip"
        )
