"""Shared by the benchmark scripts: each owns one marked section of docs/BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, begin: str, end: str, section: str) -> None:
    """Put `section` between the `begin` / `end` markers of `path` (appended if absent, the file created
    with a title if missing), leaving the rest of the file untouched."""
    block = f"{begin}\n{section}{end}\n"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# Benchmarks\n\n{block}")
        return
    text = path.read_text()
    i, j = text.find(begin), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + block.rstrip("\n") + text[j + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
