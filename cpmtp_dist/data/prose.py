"""Built-in corpus: English prose that ships with every Python install (`stdlib-prose`).

Two kinds of documents, both available without a download:

* ``topics/<name>``: the Python reference manual's help topics (``pydoc_data.topics.topics``, the text
  ``help("if")`` prints): 79 chapters of technical English.
* ``docstrings/<module path>``: per standard-library module, the module, class and function docstrings in source
  order, joined by blank lines. Modules with fewer than :data:`MIN_DOCSTRING_CHARS` characters of docstrings are
  skipped (a few one-liners are not prose). The files are those of :func:`corpus.list_source_files`, minus the
  test suites (folders ``test``, ``tests``, ``idle_test``): their docstrings describe test cases, add about a
  fifth of the text, and parsing them costs three quarters of the time to build the corpus.

Docstrings are taken from the syntax tree (``ast``), so nothing is executed and no module is imported. Like
`stdlib-code`, the held-out split is the CRC-32 rule of :func:`corpus.is_heldout` applied to the document name.
"""

from __future__ import annotations

import ast
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

from cpmtp_dist.data.corpus import (
    Document,
    Split,
    _read_text,
    check_split_args,
    is_heldout,
    list_source_files,
    stdlib_root,
)

logger = logging.getLogger(__name__)

MIN_DOCSTRING_CHARS = 200
"""A module whose docstrings total fewer characters than this gives no document."""

TEST_DIRS = frozenset({"test", "tests", "idle_test"})
"""Folder names whose modules are test suites: left out of the docstrings (see the module docstring)."""

_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_HAS_BODY = (ast.stmt, ast.excepthandler, ast.match_case)
"""Nodes that can hold statements; the walk stays out of expressions, whose nesting can exceed the recursion limit."""


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of ``node`` and of every class/function defined inside it, in source order."""
    if isinstance(node, _DOCUMENTED):
        doc = ast.get_docstring(node, clean=True)
        # cleandoc keeps a trailing line of spaces (a closing quote on its own indented line); drop it.
        doc = doc.strip() if doc else ""
        if doc:
            yield doc
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _HAS_BODY):
            yield from _docstrings(child)


def module_docstrings(source: str) -> str | None:
    """All docstrings of a module's source joined by blank lines, or None if the source does not parse."""
    try:
        with warnings.catch_warnings():
            # Old-style escapes in stdlib strings warn on parse; they are not our concern here.
            warnings.simplefilter("ignore")
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    return "\n\n".join(_docstrings(tree))


def help_topics() -> dict[str, str]:
    """The reference manual's help topics shipped with the interpreter, by topic name."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:
        raise ValueError(
            "the stdlib-prose corpus needs the standard-library module pydoc_data.topics, which this Python "
            "install lacks (some distributions ship it in a separate package); install it or use another corpus"
        ) from err
    return dict(topics)


def stdlib_prose_documents(
    split: Split,
    heldout_fraction: float = 0.02,
    max_chars: int = 0,
    *,
    root: Path | None = None,
) -> list[Document]:
    """The documents of one split of the stdlib-prose corpus, sorted by name (same contract as stdlib-code).

    Args:
        split: ``"train"`` or ``"valid"``; disjoint, and together they hold every document.
        heldout_fraction: fraction of documents (by name hash, so fixed) that form ``"valid"``.
        max_chars: cap on the total characters (0: no cap); a prefix of whole documents in name order.
        root: folder whose modules give the docstrings; defaults to the stdlib folder (tests point it elsewhere).
            The help topics come from the running interpreter either way.

    Parsing the standard library takes a few seconds; callers that need both splits should keep the results.
    """
    check_split_args(split, heldout_fraction, max_chars)
    root = stdlib_root() if root is None else Path(root)
    want_heldout = split == "valid"
    texts: dict[str, str] = {}
    unparsable = 0
    for rel in list_source_files(root):
        if TEST_DIRS.intersection(rel.split("/")[:-1]):
            continue
        name = f"docstrings/{rel}"
        # The split depends on the name only, so modules of the other split are never parsed.
        if is_heldout(name, heldout_fraction) != want_heldout:
            continue
        source = _read_text(root / rel)
        text = None if source is None else module_docstrings(source)
        if text is None:
            unparsable += 1
        elif len(text) >= MIN_DOCSTRING_CHARS:
            texts[name] = text
    for topic, text in help_topics().items():
        name = f"topics/{topic}"
        if is_heldout(name, heldout_fraction) == want_heldout and text:
            texts[name] = text
    if unparsable:
        logger.info(
            "stdlib prose (%s): skipped %d modules that could not be read or parsed", split, unparsable
        )
    docs: list[Document] = []
    total = 0
    for name in sorted(texts):
        text = texts[name]
        if max_chars and total + len(text) > max_chars:
            break
        docs.append(Document(name=name, text=text))
        total += len(text)
    return docs
