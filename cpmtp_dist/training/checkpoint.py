"""Checkpoints written atomically: a temporary folder renamed into place, `latest` written last.

Layout of `<run_dir>/checkpoints/step_0000100/`:
    model.pt      full model state dict (loads into one process for inference)
    engine/       DeepSpeed engine state (optimizer, scheduler) for resuming
    meta.json     step, tokens seen, data-loader state
    config.yaml   the resolved config
    tokenizer/    the tokenizer the model was trained with

Note: a crash while saving leaves at most a `*.tmp` folder behind; `latest` still names the previous
complete checkpoint, and `latest_checkpoint` never returns a folder without `meta.json` (written
last inside the temporary folder).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    is_writer: bool = True,
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
        _prune(root, keep_last)
    barrier()
    return final


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


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        shutil.rmtree(old)
