"""One metrics interface: console progress lines, `metrics.jsonl` and MLflow (`tracking.py`), on rank 0 only.

Also the model-FLOPs count used for MFU (CP head included).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from cpmtp_dist.config import ModelConfig
from cpmtp_dist.training.tracking import Tracker

# Dense bf16 peak of the accelerators we know (FLOP/s); MFU is omitted on anything else.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def model_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs per token: 3x the forward matmul FLOPs of trunk and CP head.

    Counts the model's arithmetic only, as MFU does: the chunked loss's recomputation of the head
    (one more head forward) is hardware work, not model work, and is not counted.
    """
    t, c = cfg.trunk, cfg.cp
    d, f, v, seq = t.hidden_size, t.ffn_hidden_size or 4 * t.hidden_size, t.vocab_size, t.seq_length
    per_layer = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * seq * d  # projections + MLP + scores/values
    trunk = t.num_layers * per_layer
    if c.parameterisation == "separate":
        phi = 0
    elif c.phi == "residual":
        phi = 2 * 2 * d * (c.phi_hidden_size or d)
    else:
        phi = 2 * d * d
    head = 2 * d * c.rank + c.rank * c.horizon * (phi + 2 * v * d)
    return 3.0 * (trunk + head)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


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
        stream: TextIO = sys.stdout,
        tracker: Tracker | None = None,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.stream = stream
        self.tracker = tracker if enabled else None
        self.start = time.time()
        self._file = open(run_dir / "metrics.jsonl", "a") if enabled else None  # noqa: SIM115

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.stream.write(self._progress_line(row) + "\n")
        self.stream.flush()
        if self.tracker is not None:
            self.tracker.log_metrics(step, row)

    def _progress_line(self, row: dict[str, Any]) -> str:
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
        parts.append(f"{elapsed / 60:.1f} min")
        return " | ".join(parts)

    def close(self, status: str = "FINISHED") -> None:
        """Close `metrics.jsonl`, then end the MLflow run with `status` (`KILLED` on preemption)."""
        if self._file is not None:
            self._file.close()
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
