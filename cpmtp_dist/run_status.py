"""A run's progress at a glance, from its run directory alone (no torch): `cpmtp status RUN_DIR`.

The training's logging rank keeps `heartbeat.json` in the run directory (`write_heartbeat`, called by the
metrics logger at its start, at every logged step and at its end): the state (`running`, `finished`,
`stopped` by a signal, `failed`), the step, the time, the process and the estimated time to the end. A run
whose heartbeat says `running` but is much older than its interval has died or hangs. The rest comes from
`config.yaml`, `metrics.jsonl` and `checkpoints/`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from cpmtp_dist.checkpoint_paths import latest_checkpoint
from cpmtp_dist.errors import UserError
from cpmtp_dist.training.tracking_worker import read_metrics

HEARTBEAT = "heartbeat.json"
STALE_AFTER_S = 300.0
"""A running heartbeat older than this and than 3 of its intervals means the run is no longer alive."""


def write_heartbeat(
    run_dir: Path, state: str, step: int, total_steps: int, eta_s: float | None, last: float | None = None
) -> float:
    """Replace `run_dir/heartbeat.json` atomically; `last` is the time of the previous beat (the interval).
    Returns this beat's time."""
    path = run_dir / HEARTBEAT
    now = time.time()
    beat = {
        "state": state,
        "step": step,
        "total_steps": total_steps,
        "time": now,
        "interval_s": None if last is None else now - last,
        "eta_s": eta_s,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(beat) + "\n")
    os.replace(tmp, path)
    return now


def format_duration(seconds: float | None) -> str:
    """3h05m, 12m30s, 45s; '-' when unknown."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _alive(beat: dict[str, Any], now: float) -> str:
    if not beat:
        return "unknown (no heartbeat.json: not started, or written by an older version)"
    age = now - beat["time"]
    where = f"pid {beat.get('pid')} on {beat.get('host')}"
    if beat["state"] != "running":
        return f"no: {beat['state']} {format_duration(age)} ago ({where})"
    limit = max(STALE_AFTER_S, 3 * (beat.get("interval_s") or 0))
    if age > limit:
        return (
            f"no: the last heartbeat is {format_duration(age)} old (running, {where}): the run died or hangs"
        )
    return f"yes: heartbeat {format_duration(age)} ago ({where})"


def run_status(run_dir: Path, now: float | None = None) -> list[str]:
    """The lines `cpmtp status` prints for `run_dir`."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} holds no config.yaml: not a run directory (cpmtp train --run-dir)")
    import yaml

    total = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"]
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_joint_loss" in r]
    events = [r for r in rows if "event" in r]
    beat_file = run_dir / HEARTBEAT
    beat = json.loads(beat_file.read_text()) if beat_file.exists() else {}
    last = train_rows[-1] if train_rows else {}
    step = max(last.get("step", 0), beat.get("step", 0))
    ckpt = latest_checkpoint(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    lines = [f"{run_dir}: step {step}/{total} ({100 * step / max(total, 1):.0f} %)"]
    lines.append(f"alive: {_alive(beat, time.time() if now is None else now)}")
    if last:
        speed = last.get("tokens_per_s")
        lines.append(
            f"last loss {last['loss']:.4f} at step {last['step']}"
            + (f"; {speed:,.0f} tokens/s" if speed is not None else "")
            + (f"; eta {format_duration(beat.get('eta_s'))}" if beat.get("state") == "running" else "")
        )
    if evals:
        lines.append(f"held-out joint loss {evals[-1]['eval_joint_loss']:.4f} at step {evals[-1]['step']}")
    lines.append(f"newest checkpoint: {ckpt if ckpt is not None else 'none yet'}")
    if events:
        counts: dict[str, int] = {}
        for row in events:
            counts[row["event"]] = counts.get(row["event"], 0) + 1
        summary = ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))
        lines.append(f"health events: {summary}; the last: step {events[-1]['step']} {events[-1]['event']}")
    else:
        lines.append("health events: none")
    return lines
