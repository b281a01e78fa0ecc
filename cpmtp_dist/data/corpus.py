"""Built-in corpus: the running interpreter's standard-library Python source.

Every machine that can run the framework has this corpus, so smoke runs, tests and small experiments need
no download. Documents are `.py` files under ``sysconfig.get_paths()["stdlib"]`` (installed third-party
packages and bytecode caches are excluded), named by their POSIX path relative to that folder and returned
in sorted name order so that every rank and every run sees the same corpus.

The held-out split is a pure function of the document name (a CRC-32 of the UTF-8 path), so it never changes
with the corpus cap, the process, or ``PYTHONHASHSEED`` (Python's ``hash()`` of a ``str`` is salted per
process and must not be used here).
"""

from __future__ import annotations

import logging
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
"""Folder names never descended into: third-party code and bytecode caches are not the stdlib corpus."""

_HASH_BUCKETS = 10_000
"""Resolution of the held-out fraction: a document is held out iff crc32(name) % 10000 < fraction * 10000."""
HELDOUT_RULE = (
    f"valid iff crc32(UTF-8 document name) % {_HASH_BUCKETS} < round(heldout_fraction * {_HASH_BUCKETS})"
)
""":func:`is_heldout` in words, as a shard manifest states it."""

Split = Literal["train", "valid"]


@dataclass(frozen=True)
class Document:
    """One source file: ``name`` is its POSIX path relative to the corpus root, ``text`` its exact content."""

    name: str
    text: str


@dataclass(frozen=True)
class SplitStats:
    documents: int
    chars: int


@dataclass(frozen=True)
class CorpusStats:
    """What :func:`corpus_stats` measured: per-split sizes and how many files could not be decoded."""

    root: str
    train: SplitStats
    valid: SplitStats
    skipped: int
    """Files that could not be read or were not valid UTF-8 (they belong to neither split)."""


def stdlib_root() -> Path:
    """The folder holding the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(name: str, heldout_fraction: float) -> bool:
    """Whether the document called ``name`` belongs to the validation split (stable across runs/processes)."""
    _check_fraction(heldout_fraction)
    threshold = round(heldout_fraction * _HASH_BUCKETS)
    return zlib.crc32(name.encode("utf-8")) % _HASH_BUCKETS < threshold


def list_source_files(root: Path | None = None) -> list[str]:
    """Sorted relative POSIX names of all `.py` files under ``root`` (default: the stdlib folder).

    Raises ValueError naming the folder when it holds no `.py` file, so that a broken or stripped interpreter
    install fails loudly instead of producing an empty corpus.
    """
    root = stdlib_root() if root is None else Path(root)
    names: list[str] = []
    # os.walk does not follow symlinked folders by default, which keeps the walk finite and the corpus stable.
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        for filename in filenames:
            if filename.endswith(".py"):
                names.append((rel_dir / filename).as_posix())
    if not names:
        raise ValueError(f"no .py files found under the standard-library folder {str(root)!r}")
    names.sort()
    return names


def _read_text(path: Path) -> str | None:
    """The exact file content decoded as strict UTF-8 (no newline translation), or None if that fails."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def stdlib_code_documents(
    split: Split,
    heldout_fraction: float = 0.02,
    max_chars: int = 0,
    *,
    root: Path | None = None,
) -> list[Document]:
    """The documents of one split of the stdlib-code corpus, sorted by name.

    Args:
        split: ``"train"`` or ``"valid"``; the two are disjoint and together cover every decodable file.
        heldout_fraction: fraction of documents (by name hash, so fixed) that form ``"valid"``.
        max_chars: cap on the total characters of the returned documents (0: no cap). Whole documents are taken
            in sorted order and the list stops before the first document that would exceed the cap, so a
            smaller cap always yields a prefix of a larger one.
        root: corpus folder; defaults to the stdlib folder (tests point it elsewhere).

    Files that cannot be read or decoded as UTF-8 are skipped and counted in a log message; the text is kept
    byte-exact (``\\r\\n`` stays ``\\r\\n``) because the tokenizer must reproduce it.
    """
    check_split_args(split, heldout_fraction, max_chars)
    root = stdlib_root() if root is None else Path(root)
    want_heldout = split == "valid"
    docs: list[Document] = []
    total = 0
    skipped = 0
    # The split is decided from the name alone, so files of the other split are never read.
    for name in list_source_files(root):
        if is_heldout(name, heldout_fraction) != want_heldout:
            continue
        text = _read_text(root / name)
        if text is None:
            skipped += 1
            continue
        if max_chars and total + len(text) > max_chars:
            break
        docs.append(Document(name=name, text=text))
        total += len(text)
    if skipped:
        logger.info("stdlib corpus (%s): skipped %d unreadable or non-UTF-8 files", split, skipped)
    return docs


def corpus_stats(
    heldout_fraction: float = 0.02, max_chars: int = 0, *, root: Path | None = None
) -> CorpusStats:
    """Documents and characters of both splits (after the ``max_chars`` cap), plus the skipped-file count."""
    root = stdlib_root() if root is None else Path(root)
    names = list_source_files(root)
    skipped = sum(1 for name in names if _read_text(root / name) is None)
    per_split = {}
    for split in ("train", "valid"):
        docs = stdlib_code_documents(split, heldout_fraction, max_chars, root=root)
        per_split[split] = SplitStats(documents=len(docs), chars=sum(len(d.text) for d in docs))
    return CorpusStats(root=str(root), train=per_split["train"], valid=per_split["valid"], skipped=skipped)


def check_split_args(split: str, heldout_fraction: float, max_chars: int) -> None:
    """The arguments every built-in corpus takes: a split name, a held-out fraction, a character cap."""
    if split not in ("train", "valid"):
        raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
    _check_fraction(heldout_fraction)
    if max_chars < 0:
        raise ValueError(f"max_chars must be >= 0, got {max_chars}")


def _check_fraction(heldout_fraction: float) -> None:
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
