"""The parity runs that the layout tests and the reshard tests share, each launched once per session.

Every run trains the tiny parity model (`parity_config.py`) for STEPS steps, logging every step and
checkpointing at steps 4 and 8: `test_parallel_layouts.py` compares a layout's whole run with one process,
and `test_reshard.py` resumes the same run's step-4 checkpoint at another layout. Sharing the runs saves a
launch per reshard case.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from parity_config import PARITY

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
SMALL = [
    *PARITY,
    f"train.steps={STEPS}",
    "train.micro_batch_size=2",
    "train.eval_batches=2",
    "checkpoint.every=4",
    # The spike detector's running mean is logged; it must be that of the logged losses at every layout.
    "train.spike_rewind=true",
    "train.spike_window=3",
]

SEPARATE = ["model.cp.parameterisation=separate"]
# Llama-style trunk: grouped-query attention (2 key/value heads for 4), SwiGLU, untied output layer.
LLAMA = ["model.trunk.num_query_groups=2", "model.trunk.mlp=swiglu", "model.trunk.untie_embeddings=true"]
# Three runs measure their peak tensor memory, which `cpmtp plan` must predict (tests/plan_check.py); the ZeRO
# ones with small buckets, or DeepSpeed's two reduce buckets (1.5 GiB in fp32) would be most of what is checked.
MEASURED = ["train.measure_memory=true"]
SMALL_BUCKETS = ["optim.reduce_bucket_size=10000"]
# name: (processes, layout settings, model settings: the single-process reference runs with these). Every
# kind of parallelism (tp, sp, pp, ep, dp) runs with the GPT-style trunk in some layout and with LLAMA in another.
LAYOUTS = {
    "tp2": (2, ["parallel.tp=2", *MEASURED], []),
    "tp2_separate": (2, ["parallel.tp=2"], SEPARATE),
    "tp2_sp_llama": (2, ["parallel.tp=2", "parallel.sequence_parallel=true"], LLAMA),
    "ep2_zero1_llama": (2, ["parallel.ep=2", "optim.zero_stage=1"], LLAMA),
    "ep2_zero2_separate": (2, ["parallel.ep=2", "optim.zero_stage=2"], SEPARATE),
    "tp2_ep2_zero1": (4, ["parallel.tp=2", "parallel.ep=2", "optim.zero_stage=1"], []),
    "dp2_zero1": (2, ["optim.zero_stage=1", *MEASURED, *SMALL_BUCKETS], []),
    # Its checkpoints are written in the background (checkpoint.async_save).
    "dp2_zero2_llama": (2, ["optim.zero_stage=2", "checkpoint.async_save=true"], LLAMA),
    "pp2_zero1": (2, ["parallel.pp=2", "optim.zero_stage=1", *MEASURED, *SMALL_BUCKETS], []),
    "tp2_pp2_zero1_llama": (4, ["parallel.tp=2", "parallel.pp=2", "optim.zero_stage=1"], LLAMA),
    "dp2_pp2_zero2_separate": (4, ["parallel.pp=2", "optim.zero_stage=2"], SEPARATE),
}


def env(cache: Path) -> dict[str, str]:
    return {**os.environ, "CPMTP_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def launch(run_dir: Path, nproc: int, overrides: list[str], cache: Path, *extra: str) -> str:
    """Train the parity model at `nproc` processes with `overrides`; fails the test if the run fails.
    Returns its standard output."""
    args = ["train", "--config", "configs/tiny.yaml", "--run-dir", str(run_dir), *SMALL, *overrides, *extra]
    cmd = [sys.executable, "-m", "launchers.cli", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "launchers.cli", *args]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, env=env(cache), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


class LayoutRuns:
    """The session's parity runs under `root`, each launched on first use."""

    def __init__(self, root: Path):
        self.root, self.cache = root, root / "cache"
        self.failed: dict[str, str] = {}  # a run that failed fails every test that needs it, once launched

    def layout(self, name: str) -> Path:
        """The run directory of layout `name` (a key of LAYOUTS)."""
        nproc, layout, model = LAYOUTS[name]
        return self._run(name, nproc, layout + model)

    def single(self, model: list[str]) -> Path:
        """The run directory of the one-process run of a model variant."""
        return self._run("single_" + "_".join(m.split("=")[1] for m in model), 1, model)

    def _run(self, name: str, nproc: int, settings: list[str]) -> Path:
        run_dir = self.root / name
        assert name not in self.failed, f"the {name} run failed: {self.failed[name]}"
        if not (run_dir / "checkpoints" / "latest").exists():
            try:
                launch(run_dir, nproc, settings, self.cache)
            except AssertionError as e:
                self.failed[name] = str(e)
                raise
        return run_dir
