"""`cpmtp plan`'s estimate against a run's measured peak (`train.measure_memory=true`): for tests that train."""

from __future__ import annotations

import json
from pathlib import Path

from cpmtp_dist.config_io import load_config
from cpmtp_dist.plan import estimate

TOLERANCE = 0.2
"""|predicted - measured| <= TOLERANCE * measured."""


def measured_peak_bytes(run_dir: Path) -> float:
    """The last `measured_memory_gib` of the run's `metrics.jsonl` (the peak over its training steps and
    ranks), in bytes."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    values = [row["measured_memory_gib"] for row in rows if row.get("measured_memory_gib") is not None]
    assert values, f"{run_dir}/metrics.jsonl has no measured_memory_gib: train with train.measure_memory=true"
    return values[-1] * 2**30


def assert_plan_matches(run_dir: Path, world_size: int, *, cuda: bool = False) -> tuple[float, float]:
    """Assert that the plan for the run's resolved `config.yaml` on `world_size` ranks is within
    TOLERANCE of the peak it measured; returns (predicted, measured) bytes."""
    cfg = load_config(run_dir / "config.yaml")
    predicted = estimate(cfg, world_size, cuda=cuda).total
    measured = measured_peak_bytes(run_dir)
    error = abs(predicted - measured) / measured
    assert error <= TOLERANCE, (
        f"{run_dir}: planned {predicted / 2**20:.3f} MiB per rank, measured {measured / 2**20:.3f} MiB "
        f"({100 * error:.1f} % off, more than {100 * TOLERANCE:.0f} %)"
    )
    return predicted, measured
