"""`cpmtp data shards`: tokenise documents and pack them into fixed-length samples in webdataset tar shards.

Output folder (format ``cpmtp_dist.shards/v1``)::

    OUT/manifest.json                 written last: its presence means the build is complete
    OUT/tokenizer/                    copy of the tokenizer (tokenizer.model + tokenizer.json)
    OUT/valid/shard-000000.tar ...    held-out split
    OUT/train/shard-000000.tar ...    training split

Every document is tokenised, EOS appended, and routed to ``valid`` when ``corpus.is_heldout(name, fraction)``,
else to ``train``; document names do not depend on where the inputs lie (:mod:`data_pipelines.sources`), and
the manifest and the progress record name the inputs by their location-independent keys, so the same corpus
at another path gives the same bytes, and a build can resume after its inputs moved. Each split is one stream: its documents' tokens concatenated in reading order and cut into
consecutive, non-overlapping samples of exactly ``seq_len + 1`` tokens (inputs and shifted targets of one
training sequence); the remainder shorter than a sample at the end of a split is dropped and counted as
``dropped_tokens``. Sample ``i`` of a split has the key ``f"{i:09d}"`` and one entry ``<key>.tokens.npy``, the
``numpy.save`` bytes of a 1-D little-endian ``uint16`` array (``uint32`` when the vocabulary exceeds 65536 ids);
keys run 0..N-1 over the split's shards in order. A shard is closed as soon as it reaches the target size, so
all shards of a split but the last hold the same number of samples. Tar members carry no time stamp or owner:
the same inputs and settings give byte-identical shards.

Note (resume): ``valid`` is built first, then ``train``, each in its own pass over the documents. After every
finished shard, ``OUT/.build/progress.json`` is replaced atomically; for each kept shard it records its size and
sha256 and where its split's stream continues: the index in the pass of the document holding the next
unwritten token, that token's offset in the document, and the documents counted so far. Because every sample
that ends inside a document also contains all tokens carried over from earlier documents, that position is all
the state there is. A re-run with the same arguments checks the settings, verifies each kept shard's sha256
(rebuilding from the first that does not match), reads past the consumed documents without tokenising them,
re-tokenises the one document the last shard ended in, and continues; the result is byte-identical to an
uninterrupted build. Shards are written under a hidden temporary name and renamed when complete, so a reader
globbing ``shard-*.tar`` never sees a partial one.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import tarfile
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cpmtp_dist.data.corpus import HELDOUT_RULE, is_heldout
from cpmtp_dist.data.hf_tokenizer import HF_FILE
from cpmtp_dist.data.shards import FORMAT, MANIFEST, file_sha256
from cpmtp_dist.data.tokenizer import CARD_FILE, MODEL_FILE, Tokenizer, load_tokenizer
from data_pipelines.sources import ResolvedInput, read_documents, resolve_inputs

logger = logging.getLogger(__name__)

PROGRESS_FORMAT = "cpmtp_dist.shards.progress/v1"
TOKENIZER_DIR = "tokenizer"
BUILD_DIR = ".build"
PROGRESS_FILE = "progress.json"
SPLITS = ("valid", "train")
"""Build order: the small held-out split first, so an interrupted build has usually finished it."""

_BATCH_CHARS = 1 << 20
"""Characters of documents per task sent to a tokenising worker (bounds pickling overhead and memory)."""
_BATCHES_PER_WORKER = 4
"""Tasks in flight per worker: enough to keep workers busy while the main process writes shards."""

_worker_tokenizer: Tokenizer | None = None
"""The tokenizer of a worker process, loaded once by :func:`_init_worker` (one per process, never shared)."""


def default_workers() -> int:
    """Tokenising processes when none is asked for: up to 4 (tokenising outpaces tar writing beyond that)."""
    return max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class ShardSettings:
    """Everything that decides the bytes of a build (worker count does not, so it is not here)."""

    inputs: tuple[str, ...]
    """The inputs' location-independent keys (``ResolvedInput.key``), not their paths."""
    seq_len: int
    dtype: str
    shard_bytes: int
    heldout_fraction: float
    jsonl_field: str
    tokenizer_sha256: str

    def as_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def build_shards(
    inputs: list[str],
    tokenizer_dir: Path,
    seq_len: int,
    out_dir: Path,
    *,
    shard_size_mb: float = 64.0,
    workers: int | None = None,
    heldout_fraction: float = 0.01,
    jsonl_field: str = "text",
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Build (or resume, or find complete) the shards of ``inputs`` in ``out_dir``; return the manifest.

    Raises ValueError naming the setting or file for: an invalid setting, a tokenizer folder without a valid
    card, an ``out_dir`` holding a different finished build, an unrelated folder or an interrupted build with
    other settings, and inputs with too few tokens for one training sample. An interruption (exception, Ctrl-C,
    kill) leaves ``out_dir`` resumable by calling again with the same arguments.
    """
    workers = default_workers() if workers is None else workers
    problems = []
    if seq_len < 2:
        problems.append(f"--seq-len must be >= 2, got {seq_len}")
    if shard_size_mb <= 0:
        problems.append(f"--shard-size-mb must be > 0, got {shard_size_mb}")
    if workers < 1:
        problems.append(f"--workers must be >= 1, got {workers}")
    if not 0.0 <= heldout_fraction < 1.0:
        problems.append(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    if not inputs:
        problems.append("no --input given")
    if problems:
        raise ValueError("; ".join(problems))
    tokenizer_dir, out_dir = Path(tokenizer_dir), Path(out_dir)
    tok = _load_tokenizer(tokenizer_dir)
    # Resolves every input now (the documents are read later): a mistyped path fails before --out is touched.
    resolved = resolve_inputs(list(inputs))
    settings = ShardSettings(
        inputs=tuple(res.key for res in resolved),  # where the inputs lie is not a setting: they may move
        seq_len=seq_len,
        dtype="uint16" if tok.vocab_size <= 1 << 16 else "uint32",
        shard_bytes=max(1, int(shard_size_mb * (1 << 20))),
        heldout_fraction=heldout_fraction,
        jsonl_field=jsonl_field,
        tokenizer_sha256=tok.fingerprint,
    )
    finished = _finished_manifest(out_dir, settings)
    if finished is not None:
        logger.info("%s already holds this build (delete it to rebuild)", out_dir)
        # A build killed after writing its manifest may have left its progress folder behind.
        shutil.rmtree(out_dir / BUILD_DIR, ignore_errors=True)
        return finished
    progress = _start_or_resume(out_dir, settings)
    _copy_tokenizer(tokenizer_dir, out_dir / TOKENIZER_DIR)
    for split in SPLITS:
        if progress["splits"][split]["done"] is None:
            _SplitWriter(split, settings, resolved, out_dir, progress).run(workers, progress_bar)
    manifest = _manifest(settings, tok, progress, resolved)
    if manifest["splits"]["train"]["sequences"] == 0:
        raise ValueError(
            f"the training split of {list(inputs)} holds fewer than seq_len + 1 = {seq_len + 1} tokens: "
            "add inputs or lower --seq-len"
        )
    if heldout_fraction > 0 and manifest["splits"]["valid"]["sequences"] == 0:
        logger.warning(
            "the held-out split has no sample (%d documents): raise --heldout-fraction or lower --seq-len",
            manifest["splits"]["valid"]["documents"],
        )
    _write_json(out_dir / MANIFEST, manifest)
    shutil.rmtree(out_dir / BUILD_DIR)
    return manifest


def _load_tokenizer(tokenizer_dir: Path) -> Tokenizer:
    """The tokenizer of ``tokenizer_dir``, after checking that its card is complete and matches the model."""
    try:
        card = json.loads((tokenizer_dir / CARD_FILE).read_text())
        tok = load_tokenizer(tokenizer_dir)
    except (OSError, ValueError) as err:  # missing files, bad JSON, unknown kind, sha256 mismatch
        raise ValueError(
            f"--tokenizer {tokenizer_dir}: not a valid tokenizer folder ({err}); "
            f"build one with `cpmtp data tokenizer --out {tokenizer_dir} ...`"
        ) from None
    wrong = [
        f"{key}={card.get(key)!r} (model: {getattr(tok, key)})"
        for key in ("vocab_size", "eos_id", "pad_id")
        if card.get(key) != getattr(tok, key)
    ]
    if wrong:
        raise ValueError(
            f"--tokenizer {tokenizer_dir}: {CARD_FILE} does not describe the model: {', '.join(wrong)}; "
            "rebuild the tokenizer folder with `cpmtp data tokenizer`"
        )
    return tok


def _finished_manifest(out_dir: Path, settings: ShardSettings) -> dict[str, Any] | None:
    """The manifest already in ``out_dir`` if it is this build; ValueError if it is another one."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    found = {
        "format": manifest.get("format"),
        "inputs": manifest.get("inputs"),
        "seq_len": manifest.get("seq_len"),
        "dtype": manifest.get("dtype"),
        "heldout_fraction": manifest.get("heldout_fraction"),
        "tokenizer sha256": manifest.get("tokenizer", {}).get("sha256"),
    }
    wanted = {
        "format": FORMAT,
        "inputs": list(settings.inputs),
        "seq_len": settings.seq_len,
        "dtype": settings.dtype,
        "heldout_fraction": settings.heldout_fraction,
        "tokenizer sha256": settings.tokenizer_sha256,
    }
    diffs = [f"{k}: {found[k]!r} there, {wanted[k]!r} now" for k in wanted if found[k] != wanted[k]]
    if diffs:
        raise ValueError(
            f"{out_dir} holds a finished build with other settings ({'; '.join(diffs)}): "
            f"use a fresh --out or delete {out_dir}"
        )
    return manifest


def _start_or_resume(out_dir: Path, settings: ShardSettings) -> dict[str, Any]:
    """The progress record to continue from: a fresh one, or the interrupted build's with verified shards."""
    path = out_dir / BUILD_DIR / PROGRESS_FILE
    if not path.is_file():
        stray = sorted(p.name for p in out_dir.iterdir() if p.name != BUILD_DIR) if out_dir.is_dir() else []
        if stray:
            raise ValueError(
                f"--out {out_dir} is not empty ({', '.join(stray[:5])}) and holds no interrupted build: "
                "use a new or empty folder"
            )
        progress = {
            "format": PROGRESS_FORMAT,
            "settings": settings.as_json(),
            "splits": {split: {"shards": [], "done": None} for split in SPLITS},
        }
        _save_progress(out_dir, progress)
        return progress
    try:
        progress = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is unreadable ({err}): delete {out_dir} and build again") from None
    old = progress.get("settings", {}) if progress.get("format") == PROGRESS_FORMAT else {}
    diffs = [f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in settings.as_json().items() if old.get(k) != v]
    if diffs:
        raise ValueError(
            f"{out_dir} holds an interrupted build with other settings ({'; '.join(diffs)}): re-run with the "
            f"same arguments to resume it, or use a fresh --out / delete {out_dir}"
        )
    for split in SPLITS:
        state = progress["splits"][split]
        kept = _verified_prefix(out_dir, state["shards"])
        if len(kept) < len(state["shards"]):
            logger.warning(
                "%s: %s does not match the record of the interrupted build; rebuilding %s from there",
                out_dir,
                state["shards"][len(kept)]["file"],
                split,
            )
            state["shards"], state["done"] = kept, None
        _remove_unlisted(out_dir / split, {Path(s["file"]).name for s in kept})
    _save_progress(out_dir, progress)
    return progress


def _verified_prefix(out_dir: Path, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The leading shards whose files exist with the recorded size and sha256."""
    for k, shard in enumerate(shards):
        file = out_dir / shard["file"]
        if (
            not file.is_file()
            or file.stat().st_size != shard["bytes"]
            or file_sha256(file) != shard["sha256"]
        ):
            return shards[:k]
    return shards


def _remove_unlisted(split_dir: Path, keep: set[str]) -> None:
    """Delete temporary and unrecorded shards (left by a build killed while writing or before recording)."""
    if split_dir.is_dir():
        for file in split_dir.iterdir():
            if file.name not in keep:
                file.unlink()


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, HF_FILE, CARD_FILE):  # the card last
        if (src / name).is_file():
            tmp = dst / f".{name}.tmp"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dst / name)


class _SplitWriter:
    """One pass over the documents that writes the shards of one split, continuing from ``progress``."""

    def __init__(
        self,
        split: str,
        settings: ShardSettings,
        resolved: list[ResolvedInput],
        out_dir: Path,
        progress: dict[str, Any],
    ) -> None:
        self.split = split
        self.settings = settings
        self.resolved = resolved
        self.out_dir = out_dir
        self.progress = progress
        self.state = progress["splits"][split]
        self.sample_tokens = settings.seq_len + 1
        self.dtype = np.dtype(settings.dtype).newbyteorder("<")
        # Every sample has the same shape, so the .npy header is computed once and the bytes equal numpy.save's.
        buf = io.BytesIO()
        np.save(buf, np.zeros(self.sample_tokens, self.dtype), allow_pickle=False)
        self.npy_header = buf.getvalue()[: -self.sample_tokens * self.dtype.itemsize]
        self.next_index = sum(s["sequences"] for s in self.state["shards"])
        self.tar: tarfile.TarFile | None = None
        self.tar_file: io.BufferedWriter | None = None
        self.shard_sequences = 0

    def run(self, workers: int, progress_bar: bool) -> None:
        shards = self.state["shards"]
        resume = shards[-1]["resume"] if shards else {"next_document": 0, "token_offset": 0, "documents": 0}
        start, offset, documents = resume["next_document"], resume["token_offset"], resume["documents"]
        check = resume.get("boundary")  # [index, name] of the document the last kept shard ended in
        # Tokens not yet in a sample: fewer than one sample's worth between documents.
        pending = np.empty(0, self.dtype)
        tokens_seen = 0
        want_heldout = self.split == "valid"

        def own_documents() -> Iterator[tuple[int, str, str]]:
            docs = read_documents(self.resolved, jsonl_field=self.settings.jsonl_field)
            for index, doc in enumerate(docs):
                if check is not None and index == check[0] and doc.name != check[1]:
                    raise ValueError(
                        f"document {index} is now {doc.name!r}, the interrupted build had {check[1]!r}: the "
                        f"inputs changed; delete {self.out_dir} and build again"
                    )
                # Consumed documents are read past, not tokenised.
                if index >= start and is_heldout(doc.name, self.settings.heldout_fraction) == want_heldout:
                    yield index, doc.name, doc.text

        bar = tqdm(desc=f"shards {self.split}", unit=" docs", initial=documents, disable=not progress_bar)
        tokenized = _tokenize(own_documents(), self.out_dir / TOKENIZER_DIR, self.dtype, workers)
        try:
            for index, name, ids in tokenized:
                first = offset if index == start else 0
                documents += 1
                tokens_seen += len(ids) - first
                bar.update(1)
                bar.set_postfix_str(f"{tokens_seen:,} tokens, {len(shards)} shards", refresh=False)
                stream = np.concatenate([pending, ids[first:]])
                n_samples = len(stream) // self.sample_tokens
                for k in range(n_samples):
                    self._add(stream[k * self.sample_tokens : (k + 1) * self.sample_tokens])
                    if self.tar_file.tell() >= self.settings.shard_bytes:
                        # Where this split's stream continues: inside this document, or at the next one.
                        done_in_doc = first + (k + 1) * self.sample_tokens - len(pending)
                        at_end = done_in_doc == len(ids)
                        self._close_shard(
                            {
                                "next_document": index + 1 if at_end else index,
                                "token_offset": 0 if at_end else done_in_doc,
                                "documents": documents if at_end else documents - 1,
                                "boundary": [index, name],
                            }
                        )
                pending = stream[n_samples * self.sample_tokens :]
            # The final shard and the end of the split are recorded in one write, so that a build killed in
            # between cannot resume with the dropped tail forgotten.
            self.state["done"] = {"documents": documents, "dropped_tokens": int(len(pending))}
            if self.tar is not None:  # a shard is open (the last one may have just been closed full)
                self._close_shard(None)
            else:
                _save_progress(self.out_dir, self.progress)
        finally:
            tokenized.close()  # stops the worker processes now, also when unwinding from an error
            bar.close()
            if self.tar is not None:  # interrupted mid-shard: drop the partial file, resume rebuilds it
                self.tar_file.close()
                self._tmp_path().unlink(missing_ok=True)

    def _shard_path(self) -> Path:
        return self.out_dir / self.split / f"shard-{len(self.state['shards']):06d}.tar"

    def _tmp_path(self) -> Path:
        path = self._shard_path()
        return path.with_name(f".{path.name}.tmp")

    def _add(self, sample: np.ndarray) -> None:
        if self.tar is None:
            self._tmp_path().parent.mkdir(parents=True, exist_ok=True)
            self.tar_file = open(self._tmp_path(), "wb")  # noqa: SIM115 - closed in _close_shard / run
            self.tar = tarfile.open(fileobj=self.tar_file, mode="w", format=tarfile.USTAR_FORMAT)
            self.shard_sequences = 0
        data = self.npy_header + sample.tobytes()
        info = tarfile.TarInfo(f"{self.next_index:09d}.tokens.npy")
        info.size, info.mode, info.mtime = len(data), 0o444, 0  # no time stamp or owner: reproducible bytes
        self.tar.addfile(info, io.BytesIO(data))
        self.next_index += 1
        self.shard_sequences += 1

    def _close_shard(self, resume: dict[str, Any] | None) -> None:
        """Finish the open shard, rename it into place, record it (with where to resume) in the progress file."""
        self.tar.close()
        self.tar_file.close()
        self.tar = None
        tmp, final = self._tmp_path(), self._shard_path()
        os.replace(tmp, final)
        self.state["shards"].append(
            {
                "file": final.relative_to(self.out_dir).as_posix(),
                "sequences": self.shard_sequences,
                "bytes": final.stat().st_size,
                "sha256": file_sha256(final),
                "resume": resume,
            }
        )
        _save_progress(self.out_dir, self.progress)


def _tokenize(
    docs: Iterable[tuple[int, str, str]], tokenizer_dir: Path, dtype: np.dtype, workers: int
) -> Iterator[tuple[int, str, np.ndarray]]:
    """``(index, name, token ids + EOS)`` for each ``(index, name, text)``, in input order.

    Note: with several workers, the main process reads documents into batches of about ``_BATCH_CHARS``
    characters and keeps at most ``_BATCHES_PER_WORKER`` batches per worker in flight in a process pool,
    collecting results in submission order. This is ``Pool.imap`` with chunks, ordered, plus back-pressure:
    ``imap`` itself reads its whole input ahead in a feeder thread, which would hold a corpus in memory.
    """
    if workers == 1:
        tok = load_tokenizer(tokenizer_dir)
        for index, name, text in docs:
            yield index, name, _encode(tok, text, dtype)
        return
    with multiprocessing.get_context().Pool(
        workers, initializer=_init_worker, initargs=(tokenizer_dir,)
    ) as pool:  # leaving the block terminates the workers, also on an error or Ctrl-C
        in_flight: deque[tuple[list[tuple[int, str, str]], Any]] = deque()
        for batch in _batches(docs):
            texts = [text for _, _, text in batch]
            in_flight.append((batch, pool.apply_async(_encode_batch, (texts, dtype.str))))
            if len(in_flight) >= workers * _BATCHES_PER_WORKER:
                yield from _collect(*in_flight.popleft())
        while in_flight:
            yield from _collect(*in_flight.popleft())


def _batches(docs: Iterable[tuple[int, str, str]]) -> Iterator[list[tuple[int, str, str]]]:
    batch: list[tuple[int, str, str]] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc[2])
        if chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _collect(batch: list[tuple[int, str, str]], result: Any) -> Iterator[tuple[int, str, np.ndarray]]:
    for (index, name, _), ids in zip(batch, result.get(), strict=True):
        yield index, name, ids


def _init_worker(tokenizer_dir: Path) -> None:
    """Load the tokenizer once per worker; Ctrl-C is left to the main process, which stops the pool."""
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_tokenizer = load_tokenizer(tokenizer_dir)


def _encode_batch(texts: list[str], dtype: str) -> list[np.ndarray]:
    return [_encode(_worker_tokenizer, text, np.dtype(dtype)) for text in texts]


def _encode(tok: Tokenizer, text: str, dtype: np.dtype) -> np.ndarray:
    ids = tok.encode(text)
    ids.append(tok.eos_id)
    return np.array(ids, dtype=dtype)


def _manifest(
    settings: ShardSettings, tok: Tokenizer, progress: dict[str, Any], resolved: list[ResolvedInput]
) -> dict[str, Any]:
    sample_tokens = settings.seq_len + 1
    splits = {}
    for split in ("train", "valid"):
        state = progress["splits"][split]
        sequences = sum(s["sequences"] for s in state["shards"])
        splits[split] = {
            "sequences": sequences,
            "tokens": sequences * sample_tokens,
            "documents": state["done"]["documents"],
            "dropped_tokens": state["done"]["dropped_tokens"],
            "shards": [{k: s[k] for k in ("file", "sequences", "bytes", "sha256")} for s in state["shards"]],
        }
    return {
        "format": FORMAT,
        "seq_len": settings.seq_len,
        "sample_tokens": sample_tokens,
        "dtype": settings.dtype,
        "tokenizer": {
            "dir": TOKENIZER_DIR,
            "sha256": tok.fingerprint,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
        },
        "inputs": list(settings.inputs),
        "document_names": [res.names for res in resolved],
        "heldout_rule": HELDOUT_RULE,
        "heldout_fraction": settings.heldout_fraction,
        "splits": splits,
    }


def _write_json(path: Path, obj: Any, *, indent: int | None = 2) -> None:
    """Write via a temporary file and rename: a reader (or a resumed build) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


def _save_progress(out_dir: Path, progress: dict[str, Any]) -> None:
    """Replace the progress file. Compact JSON: it is rewritten after every shard and grows with their number
    (about 200 bytes per shard, so 1 MB after 5000 shards of 64 MiB, rewritten once per 64 MiB written)."""
    _write_json(out_dir / BUILD_DIR / PROGRESS_FILE, progress, indent=None)
