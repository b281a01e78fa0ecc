"""Document sources: files, folders, globs, JSON Lines and the built-in corpora, read in a fixed order.

An input is one of

* a file: the whole file is one document, named by the file's own name (``data/a.txt`` gives ``a.txt``);
* a ``.jsonl`` / ``.jsonl.gz`` file: one document per line, the text taken from a string field (``text`` by
  default), named ``<file name>:<line>`` (1-based); blank lines are allowed and skipped;
* a folder: every file below it, recursively, sorted by name, hidden files and folders (``.name``) skipped;
  each file is read as above and named ``<folder's own name>/<path below the folder>`` (``/mnt/x/corpus``
  gives ``corpus/a/b.txt``);
* a glob (``data/*.txt``, ``data/**/*.jsonl``), with the rules of :mod:`glob` (``**`` is any number of
  folders; wildcards do not match hidden names): its matches, a matched folder standing for every file below
  it; named like the files of a folder input for the glob's folder (the part before the first wildcard:
  ``/mnt/x/data/**/*.txt`` gives ``data/sub/a.txt``), or by the path below the current folder when the
  glob starts with a wildcard (``*.txt`` gives ``a.txt``);
* ``builtin:stdlib-code`` or ``builtin:stdlib-prose``: the built-in corpora (names as those corpora give them,
  so the held-out split equals the one ``cpmtp train`` uses for them).

Document names decide the held-out split (``corpus.is_heldout``), so they never depend on where the data lies:
the same corpus copied or mounted elsewhere gives the same names, hence the same split and the same shards.
Each input also has such a location-independent key (:attr:`ResolvedInput.key`: ``corpus/``, ``a.txt``,
``data/**/*.txt``, ``builtin:stdlib-code``) that a shard manifest records instead of the path as spelled.

Links: symlinked files and folders are followed. A file reached under several names within one input (a
symlink or a hard link beside its target) is read once, under a name with no symlink on the way if it has one
(else the first in sorted order), and an INFO line says so; a folder is entered once, so link cycles end. The
same file reached by two different inputs is an error naming both. Text is strict UTF-8, byte-exact (no
newline translation); empty documents are skipped because they would add nothing but an EOS.

Note: inputs are resolved to files when :func:`iter_documents` is called, not when the first document is read,
so that a mistyped path fails before any tokenizer training or tokenisation starts.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
_EXAMPLES = 3
"""Names shown in an INFO or WARNING line that summarises many files."""


@dataclass(frozen=True)
class _Source:
    """One unit to read: a built-in corpus, a text file or a JSON Lines file, and the input it came from."""

    kind: str  # "builtin" | "text" | "jsonl"
    name: str  # built-in corpus name, or the file's document name (location-independent, see above)
    path: Path | None
    input: str


@dataclass(frozen=True)
class ResolvedInput:
    """One input: what it is, how it is keyed and named independently of where it lies, and its files."""

    spelled: str
    """The input as given (a path on this machine)."""
    kind: Literal["builtin", "file", "folder", "glob"]
    key: str
    """Location-independent key: ``corpus/`` (folder), ``a.txt`` (file), ``data/**/*.txt`` (glob), or the
    built-in name ``builtin:stdlib-code``."""
    names: str
    """How its documents are named, e.g. ``corpus/<path below the folder>``."""
    sources: tuple[_Source, ...]


def is_jsonl(path: str | Path) -> bool:
    """Whether ``path`` is read as JSON Lines (one document per line) rather than as one document."""
    return str(path).endswith((".jsonl", ".jsonl.gz"))


def iter_documents(inputs: list[str], *, jsonl_field: str = "text") -> Iterator[Document]:
    """All non-empty documents of ``inputs``, in input order and sorted within each input.

    Raises ValueError / FileNotFoundError at once for an input that matches nothing, an unknown built-in
    corpus or a file reached by two inputs; while reading, for a JSONL line that is not a JSON object with a
    string ``jsonl_field`` (naming the file and line), and at the end when no non-empty document was found.
    Text files that are not valid UTF-8 are skipped and counted in one warning.
    """
    return read_documents(resolve_inputs(inputs), jsonl_field=jsonl_field)


def read_documents(resolved: list[ResolvedInput], *, jsonl_field: str = "text") -> Iterator[Document]:
    """The documents of inputs already resolved by :func:`resolve_inputs` (see :func:`iter_documents`)."""
    sources = [src for res in resolved for src in res.sources]
    return _read(sources, jsonl_field, [res.spelled for res in resolved])


def resolve_inputs(inputs: list[str]) -> list[ResolvedInput]:
    """Each input resolved to its files (see the module docstring); the same errors as :func:`iter_documents`."""
    if not inputs:
        raise ValueError(f"no input given: {_INPUT_HELP}")
    resolved = [_resolve(inp) for inp in inputs]
    seen: dict[object, tuple[str, str]] = {}  # file identity (or built-in name) -> (input, spelling)
    for res in resolved:
        for src in res.sources:
            ident = src.name if src.path is None else _identity(src.path)
            spelling = res.spelled if src.path is None else str(src.path)
            if ident in seen:
                other_input, other_spelling = seen[ident]
                raise ValueError(
                    f"{other_spelling!r} (input {other_input!r}) and {spelling!r} (input {res.spelled!r}) "
                    "are the same file: pass every file once"
                )
            seen[ident] = (res.spelled, spelling)
    return resolved


def _identity(path: Path) -> tuple[int, int]:
    """Device and inode: equal for every name of one file (symlinks followed, hard links included)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _resolve(inp: str) -> ResolvedInput:
    """The files (or built-in corpus) one input stands for, in reading order, and its key."""
    if inp.startswith(BUILTIN_PREFIX):
        name = inp[len(BUILTIN_PREFIX) :]
        if name not in BUILTINS:
            raise ValueError(f"unknown built-in corpus {inp!r}: {_INPUT_HELP}")
        return ResolvedInput(
            inp, "builtin", inp, "the corpus's own names", (_Source("builtin", name, None, inp),)
        )
    if _GLOB_CHARS.intersection(inp):
        return _resolve_glob(inp)
    path = Path(inp)
    if path.is_dir():
        prefix = _own_name(path)
        files = _match(path, [], inp)
        if not files:
            raise FileNotFoundError(f"input {inp!r}: the folder holds no file (hidden files are skipped)")
        return ResolvedInput(
            inp,
            "folder",
            f"{prefix}/",
            _join(prefix, "<path below the folder>"),
            _sources(files, prefix, inp),
        )
    if path.is_file():
        names = f"{path.name}:<line>" if is_jsonl(path) else path.name
        return ResolvedInput(inp, "file", path.name, names, (_file(path, path.name, inp),))
    raise FileNotFoundError(f"input {inp!r} does not exist: {_INPUT_HELP}")


def _resolve_glob(inp: str) -> ResolvedInput:
    parts = inp.split("/")
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARS.intersection(part))
    base = "/".join(parts[:first]) or ("/" if inp.startswith("/") else ".")
    pattern = [part for part in parts[first:] if part not in ("", ".")]
    # A glob that starts with a wildcard names its matches by the path below the current folder, like a file.
    prefix = "" if os.path.normpath(base) == "." else _own_name(Path(base))
    files = _match(Path(base), pattern, inp) if Path(base).is_dir() else []
    if not files:
        raise FileNotFoundError(f"input {inp!r}: the glob matches no file; {_INPUT_HELP}")
    below = "<path below the current folder>" if not prefix else "<path below the folder>"
    return ResolvedInput(
        inp, "glob", _join(prefix, "/".join(pattern)), _join(prefix, below), _sources(files, prefix, inp)
    )


def _own_name(folder: Path) -> str:
    """The folder's own name, however it is spelled (``.``, ``data/``, ``../x``); empty for ``/``."""
    return os.path.basename(os.path.abspath(folder))


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _sources(files: list[tuple[str, Path]], prefix: str, inp: str) -> tuple[_Source, ...]:
    return tuple(_file(path, _join(prefix, rel), inp) for rel, path in files)


def _file(path: Path, name: str, inp: str) -> _Source:
    return _Source("jsonl" if is_jsonl(path) else "text", name, path, inp)


# --------------------------------------------------------------------------------------------------
# walking a folder with a glob pattern


def _match(base: Path, pattern: list[str], inp: str) -> list[tuple[str, Path]]:
    """``(path below base, path)`` of the files below ``base`` that ``pattern`` (glob parts, ``[]`` for a
    folder input) matches, a matched folder standing for every non-hidden file below it; each file once,
    sorted by its path below ``base``.

    Note: the walk is the glob's automaton over folders: a folder is entered with the set of pattern positions
    that reached it, at most once per set (by its real path), so symlinked folders are followed and cycles end.
    Folders reached without a symlink are entered first, so a file's name avoids symlinks where it can.
    """
    ext = [*pattern, "**", "*"]  # a folder matched by the pattern continues as a folder input
    end = len(pattern)
    found: dict[tuple[int, int], dict[str, tuple[bool, Path]]] = {}  # identity -> rel -> (via link, path)
    broken: dict[tuple[str, str], str] = {}  # (real folder, name) -> path
    entered: set[tuple[str, frozenset[int]]] = set()
    queues: tuple[deque, deque] = (deque([("", _closure({0}, ext), False)]), deque())
    while queues[0] or queues[1]:
        rel_dir, states, via_link = (queues[0] or queues[1]).popleft()
        folder = base / rel_dir if rel_dir else base
        key = (os.path.realpath(folder), states)
        if key in entered:
            continue
        entered.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise ValueError(
                f"input {inp!r}: cannot list {folder} ({err.strerror}): fix or leave it out"
            ) from None
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            link = via_link or entry.is_symlink()
            is_dir = entry.is_dir()
            nxt = _step(states, entry.name, ext, is_dir)
            if is_dir:
                below = frozenset(p for p in nxt if p < len(ext))
                if below:
                    queues[link].append((rel, below, link))
            elif end in nxt or len(ext) in nxt:
                if entry.is_file():
                    st = entry.stat()
                    found.setdefault((st.st_dev, st.st_ino), {})[rel] = (link, Path(entry.path))
                else:
                    broken.setdefault((key[0], entry.name), str(base / rel))
    if broken:
        logger.warning(
            "input %r: skipped %d entries that are not readable files (broken symlinks, sockets, ...), e.g. %s",
            inp,
            len(broken),
            ", ".join(sorted(broken.values())[:_EXAMPLES]),
        )
    return _once_each(found, base, inp)


def _closure(states: set[int], ext: list[str]) -> frozenset[int]:
    """Pattern positions with those after a ``**`` added (``**`` also matches no folder at all)."""
    out = set(states)
    for p in sorted(states):
        while p < len(ext) and ext[p] == "**":
            p += 1
            out.add(p)
    return frozenset(out)


def _step(states: frozenset[int], name: str, ext: list[str], is_dir: bool) -> frozenset[int]:
    """Pattern positions after matching one more path component ``name``."""
    nxt = set()
    for p in states:
        if p == len(ext):
            continue
        part = ext[p]
        if part == "**":
            if is_dir and not name.startswith("."):
                nxt.add(p)  # ** takes this folder and may take more
        elif (not name.startswith(".") or part.startswith(".")) and fnmatch.fnmatchcase(name, part):
            nxt.add(p + 1)
    return _closure(nxt, ext)


def _once_each(
    found: dict[tuple[int, int], dict[str, tuple[bool, Path]]], base: Path, inp: str
) -> list[tuple[str, Path]]:
    """One name per file: a name without a symlink on the way if there is one, else the first in order."""
    kept: list[tuple[str, Path]] = []
    twice: list[str] = []
    for names in found.values():
        ranked = sorted(names, key=lambda rel: (names[rel][0], rel))
        kept.append((ranked[0], names[ranked[0]][1]))
        twice += [f"{base / rel} (read as {base / ranked[0]})" for rel in ranked[1:]]
    if twice:
        logger.info(
            "input %r: %d file name(s) lead to a file already read under another name (symlinks or hard "
            "links); each file is read once: %s",
            inp,
            len(twice),
            ", ".join(sorted(twice)[:_EXAMPLES]) + (", ..." if len(twice) > _EXAMPLES else ""),
        )
    return sorted(kept)


# --------------------------------------------------------------------------------------------------
# reading


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
                undecodable.append(str(src.path))
                continue
        for doc in docs:
            if doc.text:
                produced += 1
                yield doc
    if undecodable:
        logger.warning(
            "skipped %d file(s) that are not UTF-8 text, e.g. %s; convert them or leave them out of the inputs",
            len(undecodable),
            ", ".join(undecodable[:_EXAMPLES]),
        )
    if not produced:
        raise ValueError(f"the inputs {inputs} hold no non-empty document")


def _jsonl_documents(src: _Source, field: str) -> Iterator[Document]:
    opener = gzip.open if str(src.path).endswith(".gz") else open
    with opener(src.path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{src.path}:{lineno}"  # errors name the file on this machine, documents their own name
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
            yield Document(f"{src.name}:{lineno}", text)
