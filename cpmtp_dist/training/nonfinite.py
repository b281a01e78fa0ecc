"""Non-finite losses and gradients (`train.on_nonfinite`), and the finiteness check before a checkpoint.

Note: one decision per step, on every rank alike, with one host synchronisation. The ranks all-reduce (SUM)
one small tensor: three flags (the step's loss is not finite: each rank's own loss sums, its dp share, and
under pp only the last stage holds them; its gradient is not finite; a stop signal arrived, from
`PreemptionWatch`), any positive sum meaning yes, and the step's summed joint loss, from which every rank
gets the step's mean loss (`train.spike_rewind` watches it: `training/spikes.py`). That exchange replaces the
preemption watch's own per-step all-reduce, so a step synchronises no more than before. It happens where the update is decided, in the torch optimizer's `step`
(`SkippableAdamW`), before anything changes: a non-finite step applies no update on any rank. DeepSpeed's
optimizer wrappers (bf16 at every ZeRO stage, fp32 at ZeRO-1/2) already skip the update on a non-finite
global gradient norm, reduced over all ranks, and then never call the torch optimizer; the exchange is then
made after `engine.step()`, and the learning-rate schedule, which DeepSpeed holds back on such a skip, is
advanced, so that it stays a function of the step number as on every other skipped step (the step's data is
consumed). Without ZeRO in fp32 DeepSpeed checks nothing: the torch optimizer's own gradients (whole,
dp-reduced) are checked there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cpmtp_dist.parallel.collectives import all_reduce_
from cpmtp_dist.training.preemption import PreemptionWatch

NONFINITE_EXIT_CODE = 4
"""`cpmtp train`'s exit status when training diverged: it stopped on a non-finite loss or gradient, or on a loss
spike that `train.spike_max_rewinds` rewinds did not cure."""


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose `step` does nothing when `allow_step()` returns False (see `StepGuard`)."""

    allow_step: Callable[[], bool] | None = None

    def step(self, closure: Any = None) -> Any:
        if self.allow_step is not None and not self.allow_step():
            return None
        return super().step(closure)


def _world_reduce(values: torch.Tensor, op: dist.ReduceOp) -> list[float]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        all_reduce_(values, op=op)
    return values.tolist()  # the one host synchronisation


@dataclass(frozen=True)
class StepOutcome:
    """What `StepGuard.end` says of the step just taken, the same on every rank."""

    nonfinite: str | None
    """What was not finite ("loss", "gradient norm"), or None if all was (then the update was applied)."""
    preempted: bool
    """A stop signal arrived on some rank."""
    loss: float
    """The step's mean joint loss over all its positions (NaN when not finite)."""


class StepGuard:
    """Decides, once per step and identically on every rank, whether the step's update is applied, and
    reports whether a stop signal arrived (see the module's note).

    `train_step` calls `begin(losses, positions)` with the tensors that accumulate the step's loss sums (the
    joint loss's first) and the step's position count over all dp ranks, before the optimizer step; the
    trainer calls `end()` after it. `loss_copies` is how many ranks hold each dp rank's loss sums (tp: tensor-
    parallel peers compute the same loss).
    """

    def __init__(
        self, engine: Any, watch: PreemptionWatch, device: torch.device, *, loss_copies: int = 1
    ) -> None:
        self.engine = engine
        self.watch = watch
        self.device = device
        self.base = getattr(engine.optimizer, "optimizer", engine.optimizer)
        if not isinstance(self.base, SkippableAdamW):
            raise TypeError(
                f"StepGuard needs the engine's torch optimizer to be a SkippableAdamW, not {self.base}"
            )
        # Only without a DeepSpeed wrapper are the gradients unchecked when the torch optimizer steps.
        self.check_grads = engine.optimizer is self.base
        self.base.allow_step = self._allow_step
        self.loss_copies = loss_copies
        self._losses: list[torch.Tensor] = []
        self._positions: torch.Tensor | None = None
        self._agreed: list[float] | None = None

    def begin(self, losses: list[torch.Tensor], positions: torch.Tensor | None = None) -> None:
        self._losses, self._positions, self._agreed = losses, positions, None

    def _flags(self, grad_bad: bool) -> list[float]:
        zero = torch.zeros((), device=self.device)
        loss = torch.stack([t.sum() for t in self._losses]).sum() if self._losses else zero
        grad = torch.ones((), device=self.device) if grad_bad else zero
        if self.check_grads and not grad_bad:
            grads = [p.grad for g in self.base.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                grad = (~torch.stack(torch._foreach_norm(grads)).sum().isfinite()).float()
        signal = 0.0 if self.watch.received is None else 1.0
        mean = (
            zero.double()
        )  # this rank's share of the step's mean joint loss; the sum over ranks is the mean
        if self._losses and self._positions is not None:
            mean = self._losses[0].double().to(self.device) / self._positions.clamp(min=1) / self.loss_copies
        bad = (~loss.isfinite()).float().to(self.device)
        values = torch.stack([bad.double(), grad.double(), zero.double() + signal, mean])
        return _world_reduce(values, dist.ReduceOp.SUM)

    def _allow_step(self) -> bool:
        if self._agreed is None:  # the first call of the step (ZeRO calls it once per parameter group)
            self._agreed = self._flags(grad_bad=False)
        return not (self._agreed[0] or self._agreed[1])

    def end(self) -> StepOutcome:
        """The outcome of the step just taken, the same on every rank. Collective."""
        if self._agreed is None:  # DeepSpeed skipped the update itself: a non-finite gradient norm
            self._agreed = self._flags(grad_bad=True)
            with warnings.catch_warnings():  # torch's "before optimizer.step()": the skip is the intent
                warnings.simplefilter("ignore", UserWarning)
                self.engine.lr_scheduler.step()  # DeepSpeed held it back; keep it at the step number
        loss_bad, grad_bad, signal, loss = self._agreed
        self._losses, self._positions, self._agreed = [], None, None
        what = "loss" if loss_bad else "gradient norm" if grad_bad else None
        return StepOutcome(what, bool(signal), loss if math.isfinite(loss) else math.nan)


class NonFiniteSteps:
    """`train.on_nonfinite` and `train.max_nonfinite_skips`: counts the skipped steps, logs each as an event
    row of metrics.jsonl (`nonfinite`, `nonfinite_skips`), and says when training stops."""

    def __init__(self, on_nonfinite: str, max_skips: int, logger: Any) -> None:
        self.on_nonfinite = on_nonfinite
        self.max_skips = max_skips
        self.logger = logger
        self.total = 0
        self.in_a_row = 0
        self.stop_reason: str | None = None

    def after_step(self, step: int, what: str | None) -> bool:
        """Record step `step`'s outcome (`StepGuard.end`); True when training must stop now."""
        if what is None:
            self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        self.logger.log(
            step,
            {  # an event row: `cpmtp status` counts the rows with an "event" (cpmtp_dist/run_status.py)
                "event": "nonfinite_skip",
                "nonfinite": f"the {what} is not finite: update skipped",
                "nonfinite_skips": self.total,
            },
        )
        if self.on_nonfinite == "stop":
            self.stop_reason = f"the {what} is not finite (train.on_nonfinite=stop)"
        elif self.in_a_row >= self.max_skips:
            self.stop_reason = (
                f"the {what} is not finite, in {self.in_a_row} steps in a row "
                f"(train.max_nonfinite_skips={self.max_skips})"
            )
        return self.stop_reason is not None

    def stop_message(self, step: int, healthy: Path | None, lr: float) -> str:
        """What `cpmtp train` prints when it stops: the step, the newest healthy checkpoint, what to try."""
        ckpt = f"the newest healthy checkpoint is {healthy}" if healthy else "no checkpoint was written"
        skip = "" if self.on_nonfinite == "skip" else ", or train.on_nonfinite=skip to skip such steps"
        return (
            f"step {step}: {self.stop_reason}; the update was not applied and training stopped; {ckpt}. "
            f"Try a lower optim.lr (now {lr:g}), a longer optim.warmup_steps or a smaller "
            f"optim.grad_clip{skip}"
        )

    def metrics(self) -> dict[str, int]:
        """`nonfinite_skips` for the logged rows, once there has been one."""
        return {"nonfinite_skips": self.total} if self.total else {}


@torch.no_grad()
def state_is_finite(engine: Any, device: torch.device) -> bool:
    """Whether every weight, master weight and optimizer moment on every rank is finite. Collective."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    tensors = list(engine.module.parameters())
    tensors += [p for g in base.param_groups for p in g["params"]]
    tensors += [v for st in base.state.values() for v in st.values() if torch.is_tensor(v)]
    finite = torch.stack([t.detach().isfinite().all().to(device) for t in tensors]).all()
    bad = (~finite).float().reshape(1)
    return not _world_reduce(bad, dist.ReduceOp.MAX)[0]


def ready_to_save(engine: Any, device: torch.device, step: int, *, announce: bool) -> bool:
    """Whether the state after step `step` may be saved: every weight and moment finite on every rank (else
    a warning, printed where `announce`). Creates AdamW's state first if no step has made it yet (every
    step so far skipped). Collective."""
    from cpmtp_dist.parallel.sharded_state import ensure_optimizer_state  # Megatron: only when saving

    ensure_optimizer_state(engine)
    if state_is_finite(engine, device):
        return True
    if announce:
        print(f"warning: step {step}: weights or optimizer moments not finite: no checkpoint", flush=True)
    return False
