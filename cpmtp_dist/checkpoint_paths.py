"""Finding checkpoints on disk, without torch: config validation checks `finetune.init_from` with these.

A complete checkpoint is a `step_N` folder holding `meta.json` (see `training/checkpoint.py` for what else
it holds and how it is written); `latest` in a checkpoints folder names the newest one.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from pathlib import Path

from cpmtp_dist.errors import UserError

__all__ = [
    "FinetuneError",
    "ResumeError",
    "file_digests",
    "latest_checkpoint",
    "newest_verified_checkpoint",
    "resolve_init_checkpoint",
    "verify_checkpoint",
]


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
    done = complete_checkpoints(root)
    return done[-1] if done else None


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete `step_N` folders under `root` (meta.json written, not an unfinished `*.tmp`), oldest first."""
    return sorted(
        p
        for p in root.glob("step_*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / "meta.json").exists()
    )


def checkpoint_step(folder: Path) -> int:
    """The step of checkpoint folder `step_N` (`training.checkpoint.checkpoint_name`)."""
    return int(folder.name.removeprefix("step_"))


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


# --- integrity --------------------------------------------------------------------------------------------
# A checkpoint's meta.json lists every other file it holds with its size and CRC-32 ("files"), recorded when
# it was saved (training/checkpoint.py: each rank digests the files it wrote). Resuming checks the sizes (fast:
# a truncated or missing file) or, with `--verify-checkpoint full`, reads every file again.


def file_digests(folder: Path, names: Iterable[str]) -> dict[str, dict[str, object]]:
    """{name: {"bytes": size, "crc32": hex}} for the files `names` (relative to `folder`)."""
    out: dict[str, dict[str, object]] = {}
    for name in names:
        crc = 0
        with open(folder / name, "rb") as f:
            while chunk := f.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
        out[name] = {"bytes": (folder / name).stat().st_size, "crc32": f"{crc:08x}"}
    return out


def verify_checkpoint(folder: Path, full: bool = False) -> str | None:
    """What is wrong with checkpoint `folder`, naming the file, or None: every file its meta.json lists is
    there with its recorded size and, with `full`, its recorded CRC-32. A checkpoint saved before checksums
    were recorded passes."""
    try:
        files = json.loads((folder / "meta.json").read_text()).get("files")
    except (OSError, ValueError) as err:
        return f"{folder / 'meta.json'} cannot be read ({err})"
    for name, want in (files or {}).items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{path} holds {path.stat().st_size} bytes, {want['bytes']} when saved (truncated or replaced)"
    for name, want in (files or {}).items() if full else ():
        got = file_digests(folder, [name])[name]["crc32"]
        if got != want["crc32"]:
            return f"{folder / name}: CRC-32 {got}, {want['crc32']} when saved (the file is corrupt)"
    return None


def newest_verified_checkpoint(root: Path, full: bool = False) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under `root` that verifies, and what is wrong with each newer one."""
    damaged: list[str] = []
    for folder in reversed(complete_checkpoints(root)):
        problem = verify_checkpoint(folder, full)
        if problem is None:
            return folder, damaged
        damaged.append(problem)
    return None, damaged
