"""Checkpoints written atomically: a temporary folder renamed into place, `latest` written last.

Layout of `<run_dir>/checkpoints/step_0000100/`:
    model.pt      full model state dict (loads into one process for inference)
    engine/       DeepSpeed engine state (optimizer, scheduler) for resuming
    meta.json     step, tokens seen, data-loader state
    rng/          every rank's random-number generator states (rank_00000.pt, ...)
    config.yaml   the resolved config
    tokenizer/    the tokenizer the model was trained with

Note: a crash while saving leaves at most a `*.tmp` folder behind; `latest` still names the previous
complete checkpoint, and `latest_checkpoint` never returns a folder without `meta.json` (written
last inside the temporary folder).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    config_yaml: str,
    tokenizer_dir: Path | None,
    engine: Any = None,
    keep_last: int = 0,
    keep_every: int = 0,
    is_writer: bool = True,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write checkpoint `step` under `root` and return its folder.

    Collective: every rank calls it (DeepSpeed saves its optimizer shards from every rank into
    `engine/`); the rank with `is_writer` creates the folder and writes everything else. `barrier`
    synchronises the ranks (a no-op in one process). `root` must be on a filesystem all ranks share.
    """
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    if is_writer:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    if engine is not None:
        engine.save_checkpoint(str(tmp / "engine"), tag="state", save_latest=False)
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    barrier()
    if not is_writer:
        barrier()
        return final
    torch.save(model_state, tmp / "model.pt")
    (tmp / "config.yaml").write_text(config_yaml)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
    _write_atomic(tmp / "meta.json", json.dumps({"step": step, **meta}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / "latest", final.name)
    if keep_last > 0:
        prune_checkpoints(root, keep_last, keep_every)
    barrier()
    return final


def rng_state() -> dict[str, Any]:
    """This process's generator states: torch (CPU and CUDA), numpy, Python."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (or `root` itself if it is one), else None."""
    if (root / "meta.json").exists():
        return root
    pointer = root / "latest"
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if (cand / "meta.json").exists():
            return cand
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "meta.json").exists())
    return done[-1] if done else None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prune_checkpoints(root: Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete complete checkpoints except the newest `keep_last` and those of steps that are multiples of
    `keep_every` (when > 0). Unfinished `*.tmp` folders are left to the next save of their step."""
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        step = int(old.name.removeprefix("step_"))
        if keep_every > 0 and step % keep_every == 0:
            continue
        shutil.rmtree(old)
