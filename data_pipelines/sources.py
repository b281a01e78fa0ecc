"""Document sources: files, folders, globs, JSON Lines and the built-in corpora, read in a fixed order.

An input is one of

* a file: the whole file is one document, named by its path as given (``data/a.txt``);
* a ``.jsonl`` / ``.jsonl.gz`` file: one document per line, the text taken from a string field (``text`` by
  default), named ``path:lineno`` (1-based); blank lines are allowed and skipped;
* a folder: every file below it, recursively, sorted by relative path, hidden files and folders (``.name``)
  skipped; each file is read as above and named ``folder/relative/path``;
* a glob (``data/*.txt``, ``data/**/*.jsonl``): the matches sorted by path, each read as above;
* ``builtin:stdlib-code`` or ``builtin:stdlib-prose``: the built-in corpora (names as those corpora give them,
  so the held-out split equals the one ``cpmtp train`` uses for them).

Document names decide the held-out split (``corpus.is_heldout``), so they are kept exactly as spelled: pass
relative paths and the split stays the same wherever the data lives. Text is strict UTF-8, byte-exact (no newline
translation); empty documents are skipped because they would add nothing but an EOS.

Note: inputs are resolved to files when :func:`iter_documents` is called, not when the first document is read,
so that a mistyped path fails before any tokenizer training or tokenisation starts.
"""

from __future__ import annotations

import glob
import gzip
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cpmtp_dist.data.corpus import Document, stdlib_code_documents
from cpmtp_dist.data.prose import stdlib_prose_documents

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTINS: dict[str, Callable[[], list[Document]]] = {
    # heldout_fraction=0 puts every document in "train": here we want the whole corpus; the caller splits it.
    "stdlib-code": lambda: stdlib_code_documents("train", heldout_fraction=0.0),
    "stdlib-prose": lambda: stdlib_prose_documents("train", heldout_fraction=0.0),
}
"""Built-in corpora by name (``builtin:<name>``): every document, sorted by name."""

_GLOB_CHARS = frozenset("*?[")
_INPUT_HELP = "pass a file, a folder, a glob such as 'data/**/*.txt', or one of " + ", ".join(
    BUILTIN_PREFIX + name for name in BUILTINS
)


@dataclass(frozen=True)
class _Source:
    """One unit to read: a built-in corpus, a text file or a JSON Lines file, and the input it came from."""

    kind: str  # "builtin" | "text" | "jsonl"
    name: str  # built-in corpus name, or the file's document name (its path as spelled)
    path: Path | None
    input: str


def is_jsonl(path: str | Path) -> bool:
    """Whether ``path`` is read as JSON Lines (one document per line) rather than as one document."""
    return str(path).endswith((".jsonl", ".jsonl.gz"))


def iter_documents(inputs: list[str], *, jsonl_field: str = "text") -> Iterator[Document]:
    """All non-empty documents of ``inputs``, in input order and sorted within each input.

    Raises ValueError / FileNotFoundError at once for an input that matches nothing, an unknown built-in
    corpus or a file reached twice; while reading, for a JSONL line that is not a JSON object with a string
    ``jsonl_field`` (naming the file and line), and at the end when no non-empty document was found. Text files
    that are not valid UTF-8 are skipped and counted in one warning.
    """
    if not inputs:
        raise ValueError(f"no input given: {_INPUT_HELP}")
    return _read(_resolve_all(inputs), jsonl_field, inputs)


def _resolve_all(inputs: list[str]) -> list[_Source]:
    sources: list[_Source] = []
    seen: dict[str, str] = {}  # real path (or built-in name) -> the input that brought it
    for inp in inputs:
        for src in _resolve(inp):
            key = src.name if src.path is None else os.path.realpath(src.path)
            if key in seen:
                raise ValueError(
                    f"{src.name!r} is reached by both inputs {seen[key]!r} and {inp!r}: pass every file once"
                )
            seen[key] = inp
            sources.append(src)
    return sources


def _resolve(inp: str) -> list[_Source]:
    """The files (or built-in corpus) one input stands for, in reading order."""
    if inp.startswith(BUILTIN_PREFIX):
        name = inp[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise ValueError(f"unknown built-in corpus {inp!r}: {_INPUT_HELP}")
        return [_Source("builtin", name, None, inp)]
    if _GLOB_CHARS.intersection(inp):
        matches = sorted(glob.glob(inp, recursive=True))
        if not matches:
            raise FileNotFoundError(f"input {inp!r}: the glob matches no file; {_INPUT_HELP}")
        sources: list[_Source] = []
        for match in matches:
            path = Path(match)
            sources += _folder(path, inp) if path.is_dir() else [_file(path, inp)]
        return sources
    path = Path(inp)
    if path.is_dir():
        sources = _folder(path, inp)
        if not sources:
            raise FileNotFoundError(f"input {inp!r}: the folder holds no file (hidden files are skipped)")
        return sources
    if path.is_file():
        return [_file(path, inp)]
    raise FileNotFoundError(f"input {inp!r} does not exist: {_INPUT_HELP}")


def _file(path: Path, inp: str) -> _Source:
    return _Source("jsonl" if is_jsonl(path) else "text", path.as_posix(), path, inp)


def _folder(root: Path, inp: str) -> list[_Source]:
    """Every non-hidden file below ``root``, sorted by relative path (symlinked folders are not followed)."""
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        rels += [(rel_dir / f).as_posix() for f in filenames if not f.startswith(".")]
    return [_file(root / rel, inp) for rel in sorted(rels)]


def _read(sources: list[_Source], jsonl_field: str, inputs: list[str]) -> Iterator[Document]:
    produced = 0
    undecodable: list[str] = []
    for src in sources:
        if src.kind == "builtin":
            docs: Iterator[Document] = iter(BUILTINS[src.name]())
        elif src.kind == "jsonl":
            docs = _jsonl_documents(src, jsonl_field)
        else:
            try:
                docs = iter([Document(src.name, src.path.read_bytes().decode("utf-8"))])
            except UnicodeDecodeError:
                undecodable.append(src.name)
                continue
        for doc in docs:
            if doc.text:
                produced += 1
                yield doc
    if undecodable:
        logger.warning(
            "skipped %d file(s) that are not UTF-8 text, e.g. %s; convert them or leave them out of the inputs",
            len(undecodable),
            ", ".join(undecodable[:3]),
        )
    if not produced:
        raise ValueError(f"the inputs {inputs} hold no non-empty document")


def _jsonl_documents(src: _Source, field: str) -> Iterator[Document]:
    opener = gzip.open if src.name.endswith(".gz") else open
    with opener(src.path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{src.name}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: the line is not UTF-8 ({err.reason}); fix or remove it") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg}); fix or remove the line") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(
                    f"{where}: no string field {field!r} (found {keys}); pass the right --jsonl-field"
                )
            yield Document(where, text)
