"""Finding checkpoints on disk, without torch: config validation checks `finetune.init_from` with these.

A complete checkpoint is a `step_N` folder holding `meta.json` (see `training/checkpoint.py` for what else
it holds and how it is written); `latest` in a checkpoints folder names the newest one.
"""

from __future__ import annotations

from pathlib import Path

from cpmtp_dist.errors import UserError

__all__ = ["FinetuneError", "ResumeError", "latest_checkpoint", "resolve_init_checkpoint"]


class ResumeError(UserError):
    """A checkpoint that cannot continue this run as configured: the message says what to change."""


class FinetuneError(UserError):
    """A source checkpoint that cannot start this run as configured: the message says what to change."""


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (or `root` itself if it is one), else None."""
    if (root / "meta.json").exists():
        return root
    pointer = root / "latest"
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if (cand / "meta.json").exists():
            return cand
    done = sorted(
        p
        for p in root.glob("step_*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / "meta.json").exists()
    )
    return done[-1] if done else None


def resolve_init_checkpoint(init_from: str | Path) -> Path:
    """`finetune.init_from` -> the checkpoint folder it names: itself, or the newest complete checkpoint of
    a run's `checkpoints/` folder (or of a run directory holding one)."""
    path = Path(init_from)
    if not path.is_dir():
        raise FinetuneError(
            f"finetune.init_from={str(init_from)!r} does not exist (or is not a folder): set it to a checkpoint "
            "folder (runs/NAME/checkpoints/step_N) or a run's checkpoints/ folder"
        )
    found = latest_checkpoint(path)
    if found is None and (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints")
    if found is None:
        raise FinetuneError(
            f"finetune.init_from={str(init_from)!r} holds no complete checkpoint (a step_N folder with "
            "meta.json and state/): set it to a checkpoint folder or a run's checkpoints/ folder"
        )
    return found
