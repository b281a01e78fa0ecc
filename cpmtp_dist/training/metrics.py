"""One metrics interface: console progress lines, `metrics.jsonl` and MLflow (`tracking.py`), on rank 0 only.

Also the FLOPs counts behind MFU (model FLOPs, CP head included) and HFU (hardware FLOPs: what the GPU
actually computes, the chunked loss's recomputation included), and the accelerators' peaks.
"""

from __future__ import annotations

import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import torch

from cpmtp_dist.run_status import format_duration, write_heartbeat
from cpmtp_dist.training.tracking import Tracker

PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM ("H100 80GB HBM3")
    ("A100", 312e12),  # SXM4 and PCIe alike
    ("B200", 2250e12),
    ("L40S", 362e12),
    ("A10", 125e12),
)
"""Dense (no sparsity) bf16 tensor-core peak per GPU in FLOP/s, from NVIDIA's data sheets, matched against
`torch.cuda.get_device_name()` in this order, case-insensitively: the first name it contains wins (so the
NVL and PCIe variants come before their SXM parts, and A100 before A10)."""


def peak_flops(device: torch.device, peak_tflops: float = 0.0) -> float | None:
    """The bf16 peak (FLOP/s) of one accelerator `device`: `peak_tflops` (`train.peak_tflops`) when set, else
    the table's value for the GPU's name; None on a CPU, and for an unknown GPU without `peak_tflops` (with a
    warning that says what to set), which leaves MFU out of the metrics."""
    if device.type != "cuda":
        return None
    if peak_tflops > 0:
        return peak_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    peak = gpu_peak_flops(name)
    if peak is None:
        warnings.warn(
            f"no bf16 peak known for the GPU {name!r}: MFU is not logged; set train.peak_tflops to its dense "
            "bf16 peak in TFLOP/s",
            stacklevel=2,
        )
    return peak


def gpu_peak_flops(name: str) -> float | None:
    """The table's dense bf16 peak for a GPU called `name`, or None."""
    low = name.lower()
    return next((v for k, v in PEAK_BF16_FLOPS if k.lower() in low), None)


def entropy(p: torch.Tensor) -> float:
    """Entropy in nats of a probability vector (0 log 0 = 0)."""
    p = p[p > 0]
    return float(-(p * p.log()).sum())


class MetricsLogger:
    """Writes one JSON object per logged step to `metrics.jsonl` and a progress line to the console, and
    hands the row to the MLflow `tracker` when there is one.

    Only the logging rank writes; the others hold a disabled logger, so callers need no rank checks.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        stream: TextIO | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stdout  # the current one, not import time's
        self.tracker = tracker if enabled else None
        self.start = time.time()
        self.run_dir = run_dir
        # The estimated time to the end measures from here, then from the first logged step (past the warm-up).
        self._pace: tuple[float, int] = (self.start, start_step)
        self._paced = False
        self._step = start_step
        self._file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115
        self._beat = write_heartbeat(run_dir, "running", start_step, total_steps, None) if enabled else None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        eta = self._eta(step) if "loss" in row else None
        self.stream.write(self._progress_line(row, eta) + "\n")
        self.stream.flush()
        if "loss" in row:
            self._step = step
            self._beat = write_heartbeat(self.run_dir, "running", step, self.total_steps, eta, self._beat)
        if self.tracker is not None:
            self.tracker.log_metrics(step, row)

    def _eta(self, step: int) -> float | None:
        """Seconds to the last step at the pace since the reference (time, step)."""
        t0, s0 = self._pace
        now = time.time()
        eta = (now - t0) / (step - s0) * (self.total_steps - step) if step > s0 else None
        if not self._paced:
            self._pace, self._paced = (now, step), True
        return eta

    def _progress_line(self, row: dict[str, Any], eta: float | None = None) -> str:
        if "eval_joint_loss" in row:
            return (
                f"eval  step {row['step']:>6} | joint {_f(row['eval_joint_loss'])} "
                f"| ntp {_f(row['eval_ntp_loss'])} | ppl {_f(row['eval_ntp_ppl'], '.1f')}"
            )
        elapsed = time.time() - self.start
        parts = [
            f"step {row['step']:>6}/{self.total_steps}",
            f"loss {_f(row.get('loss'))}",
            f"joint {_f(row.get('joint_loss'))}",
            f"ntp {_f(row.get('ntp_loss'))}",
            f"acc1 {_f(row.get('acc_head_1'), '.3f')}",
            f"gnorm {_f(row.get('grad_norm'), '.3f')}",
            f"lr {_f(row.get('lr'), '.2e')}",
            f"{_f(row.get('tokens_per_s'), '.0f')} tok/s",
        ]
        if row.get("mfu") is not None:
            parts.append(f"mfu {100 * row['mfu']:.1f}%")
        parts.append(f"{elapsed / 60:.1f} min, eta {format_duration(eta)}")
        return " | ".join(parts)

    def close(self, status: str = "FINISHED") -> None:
        """Close `metrics.jsonl`, then end the MLflow run with `status` (`KILLED` on preemption)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            state = {"FINISHED": "finished", "KILLED": "stopped"}.get(status, "failed")
            write_heartbeat(self.run_dir, state, self._step, self.total_steps, None, self._beat)
        if self.tracker is not None:
            self.tracker.close(status)


def _f(v: Any, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
