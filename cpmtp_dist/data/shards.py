"""Streaming loader over prepared webdataset shards (`cpmtp data shards`), with exact mid-epoch resume.

A prepared dataset is a folder with `manifest.json`, `tokenizer/`, and `train/`, `valid/` tar shards whose
samples are `.tokens.npy` arrays of `seq_len + 1` token ids (see `data_pipelines/shards.py`).

Order. The loader of data-parallel rank r runs W workers (`data.num_workers`; 0 means one in-process
worker); worker w is global worker g = r * W + w of G = dp * W. An epoch of a dataset is dealt out in
units (`epoch_pieces`): its shards, or, when it has fewer shards than G readers, contiguous sample ranges of
its shards, so that every reader gets one. In epoch e the units are permuted by a generator seeded with
(seed, e) and worker g reads units g, g + G, g + 2G, ... of that order, through a shuffle buffer of
`data.shuffle_buffer` samples whose generator is seeded with (seed, e, g); at the end of its units the
worker empties the buffer and starts epoch e + 1. A blend of datasets picks
the source of each sample from counter-based random numbers seeded with (seed, g). Every stream is a pure
function of the seed, dp and W: TP and PP peers (same dp rank) read the same samples, and the order does not
depend on timing.

Resume. A DataLoader hands out its workers' batches round robin. Each batch carries its worker's state
after the batch (per source: epoch and samples taken in that epoch; the number of blend draws); the
loader keeps the last state of every worker and the number of batches taken, and that is its
`state_dict`. A resumed loader restarts each worker from its state: the worker replays its current
epoch's shards up to the position (the shuffle buffer and generators are thereby restored exactly; the
replayed samples are read but not sent) and rotates the workers so that the next batch comes from the
worker that was next. The resumed stream is therefore exactly the uninterrupted one. A checkpoint records
the states of every data-parallel rank (`combine_states`, gathered by `source.gather_loader_state`), and each
rank restarts its own readers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cpmtp_dist.data.data_path import ShardError

FORMAT = "cpmtp_dist.shards/v1"
MANIFEST = "manifest.json"
_BLEND_CHUNK = 4096
"""Blend choices are drawn in chunks from generators seeded with (seed, g, chunk index): O(1) to resume."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    sequences: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardSet:
    """One prepared dataset, its manifest checked against the files on disk (existence and size)."""

    root: Path
    seq_len: int
    dtype: np.dtype
    tokenizer_dir: Path
    tokenizer_sha256: str
    vocab_size: int
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @classmethod
    def load(cls, root: Path | str) -> ShardSet:
        root = Path(root)
        path = root / MANIFEST
        if not path.is_file():
            raise ShardError(
                f"{path} does not exist: data.path must be a folder written by `cpmtp data shards` "
                "(an interrupted build has no manifest yet: run the same command again to finish it)"
            )
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ShardError(
                f"{path} is not valid JSON ({err}): rebuild the folder with `cpmtp data shards`"
            ) from None
        if m.get("format") != FORMAT:
            raise ShardError(f"{path}: format {m.get('format')!r}, expected {FORMAT!r}: rebuild the shards")
        try:
            tok = m["tokenizer"]
            splits = {}
            for name in ("train", "valid"):
                infos = []
                for s in m["splits"][name]["shards"]:
                    info = ShardInfo(root / s["file"], int(s["sequences"]), int(s["bytes"]), str(s["sha256"]))
                    if not info.path.is_file():
                        raise ShardError(
                            f"{info.path} is listed in {path} but missing: restore it, or rebuild the folder "
                            "with `cpmtp data shards`"
                        )
                    size = info.path.stat().st_size
                    if size != info.bytes:
                        raise ShardError(
                            f"{info.path} has {size} bytes, {path} says {info.bytes}: the shard is truncated "
                            "or was replaced; rebuild it with `cpmtp data shards`"
                        )
                    infos.append(info)
                splits[name] = infos
            shard_set = cls(
                root=root,
                seq_len=int(m["seq_len"]),
                dtype=np.dtype(m["dtype"]),
                tokenizer_dir=root / tok.get("dir", "tokenizer"),
                tokenizer_sha256=str(tok["sha256"]),
                vocab_size=int(tok["vocab_size"]),
                splits=splits,
            )
        except KeyError as err:
            raise ShardError(
                f"{path} lacks the field {err}: rebuild the folder with `cpmtp data shards`"
            ) from None
        if not shard_set.splits["train"]:
            raise ShardError(f"{path}: the train split has no shards (empty corpus?)")
        return shard_set

    def check_tokenizer(self, sha256: str) -> None:
        """The tokenizer in use must be the one the shards were tokenised with."""
        if sha256 != self.tokenizer_sha256:
            raise ShardError(
                f"{self.manifest_path}: the shards were tokenised with tokenizer sha256 "
                f"{self.tokenizer_sha256[:12]}…, but the tokenizer in use has {sha256[:12]}…: use the "
                f"tokenizer in {self.tokenizer_dir} or rebuild the shards with this tokenizer"
            )


# --------------------------------------------------------------------------------------------------
# reading one shard


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_shard(
    info: ShardInfo,
    dtype: np.dtype,
    sample_tokens: int,
    *,
    verify: bool,
    first: int = 0,
    stop: int | None = None,
) -> Iterator[np.ndarray]:
    """The samples ``first .. stop - 1`` of one shard (default: all), in order. Raises ShardError (naming the
    file) for a checksum that differs from the manifest, an unreadable or truncated tar, a malformed sample,
    or (when read to its end) a wrong sample count."""
    if verify:
        digest = file_sha256(info.path)
        if digest != info.sha256:
            raise ShardError(
                f"{info.path}: sha256 {digest[:12]}… differs from the manifest's {info.sha256[:12]}…: the shard "
                "is corrupt; rebuild it with `cpmtp data shards`, or set data.skip_corrupt_shards=true"
            )
    count = 0
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(info.path)]), wds.tarfile_to_samples())
    stop = info.sequences if stop is None else stop
    try:
        for sample in pipeline:
            if count >= stop and stop < info.sequences:  # a range that ends before the shard does
                return
            if count < first:  # before the requested range: counted, not decoded
                count += 1
                continue
            raw = sample.get("tokens.npy")
            if raw is None:
                raise ShardError(f"{info.path}: sample {sample.get('__key__')!r} has no tokens.npy entry")
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
            if arr.dtype != dtype or arr.shape != (sample_tokens,):
                raise ShardError(
                    f"{info.path}: sample {sample['__key__']!r} is {arr.dtype}{list(arr.shape)}, the manifest "
                    f"says {dtype}[{sample_tokens}]: rebuild the shards"
                )
            count += 1
            yield arr
    except ShardError:
        raise
    except Exception as err:  # tarfile/webdataset errors of a damaged file
        raise ShardError(
            f"{info.path}: cannot read the shard after {count} samples ({type(err).__name__}: {err}); rebuild "
            "it with `cpmtp data shards`, or set data.skip_corrupt_shards=true"
        ) from err
    if count != info.sequences:
        raise ShardError(
            f"{info.path}: {count} samples, the manifest says {info.sequences}: the shard is truncated; "
            "rebuild it with `cpmtp data shards`, or set data.skip_corrupt_shards=true"
        )


# --------------------------------------------------------------------------------------------------
# one worker's endless stream


def epoch_pieces(shards: list[ShardInfo], readers: int, name: str) -> list[tuple[int, int, int]]:
    """The units an epoch of ``shards`` is dealt out in to ``readers`` readers: ``(shard, first, stop)``.

    Whole shards when there are at least as many shards as readers. Otherwise every shard is cut into ``k``
    contiguous sample ranges of (nearly) equal size, the smallest ``k`` that gives every reader a range (a
    shard of fewer than ``k`` samples gives one range per sample). Either way each sample of the split is in
    exactly one unit. Raises ShardError when the split holds fewer samples than there are readers.
    """
    if len(shards) >= readers:
        return [(i, 0, info.sequences) for i, info in enumerate(shards)]
    total = sum(info.sequences for info in shards)
    if total < readers:
        raise ShardError(
            f"{name}: {total} training samples for {readers} readers (data-parallel size × data.num_workers, "
            "0 workers counting as 1): every reader needs a sample; lower data.num_workers, or add data"
        )
    k = -(-readers // len(shards))
    while sum(min(k, info.sequences) for info in shards) < readers:
        k += 1
    pieces = []
    for i, info in enumerate(shards):
        m = min(k, info.sequences)
        if m == 0:
            continue
        bounds = [info.sequences * j // m for j in range(m + 1)]
        pieces += [(i, bounds[j], bounds[j + 1]) for j in range(m)]
    return pieces


@dataclass
class _SourceState:
    epoch: int = 0
    position: int = 0  # samples this worker has taken from the current epoch
    skipped: int = 0  # corrupt shards skipped so far


class _SourceStream:
    """One dataset's endless stream for global worker g (see the module docstring)."""

    def __init__(
        self,
        shards: list[ShardInfo],
        *,
        dtype: np.dtype,
        sample_tokens: int,
        seed: int,
        worker: int,
        workers: int,
        buffer: int,
        verify: bool,
        skip_corrupt: bool,
        name: str,
    ) -> None:
        self.pieces = epoch_pieces(shards, workers, name)
        self.shards, self.dtype, self.sample_tokens = shards, dtype, sample_tokens
        self.seed, self.worker, self.workers, self.buffer = seed, worker, workers, max(1, buffer)
        self.verify, self.skip_corrupt, self.name = verify, skip_corrupt, name

    def _epoch_samples(self, epoch: int, state: _SourceState) -> Iterator[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pieces))
        rng = np.random.default_rng([self.seed, epoch, self.worker])
        buf: list[np.ndarray] = []
        for index in order[self.worker :: self.workers]:
            shard, first, stop = self.pieces[int(index)]
            info = self.shards[shard]
            try:
                samples = read_shard(
                    info, self.dtype, self.sample_tokens, verify=self.verify, first=first, stop=stop
                )
                for sample in samples:
                    if len(buf) < self.buffer:
                        buf.append(sample)
                        continue
                    j = int(rng.integers(self.buffer))
                    buf[j], sample = sample, buf[j]
                    yield sample
            except ShardError as err:
                if not self.skip_corrupt:
                    raise
                # A shard that fails part-way may have fed samples already: they stay (deterministically).
                state.skipped += 1
                log.warning("skipping a corrupt shard (data.skip_corrupt_shards=true): %s", err)
        rng.shuffle(buf)
        yield from buf

    def samples(self, state: _SourceState) -> Iterator[np.ndarray]:
        """Endless samples from `state` on; `state` is advanced as samples are taken."""
        skip = state.position
        epoch = state.epoch
        while True:
            produced = 0
            for sample in self._epoch_samples(epoch, state):
                produced += 1
                if skip:
                    skip -= 1
                    continue
                state.position += 1
                yield sample
            if produced == 0:
                raise ShardError(f"{self.name}: worker {self.worker} read no sample in epoch {epoch}")
            if skip:
                raise ShardError(f"{self.name}: the resume position is past the end of epoch {epoch}")
            epoch += 1
            state.epoch, state.position = epoch, 0


class ShardStream(IterableDataset):
    """Micro-batches of one data-parallel rank; a DataLoader runs it in `num_workers` processes."""

    def __init__(
        self,
        sets: list[ShardSet],
        weights: list[float],
        *,
        seed: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int,
        micro_batch_size: int,
        buffer: int,
        verify: bool,
        skip_corrupt: bool,
        worker_states: list[dict[str, Any] | None],
        rotation: int,
    ) -> None:
        self.sets, self.weights = sets, np.cumsum(weights) / np.sum(weights)
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.workers = max(1, num_workers)
        self.micro_batch_size, self.buffer = micro_batch_size, buffer
        self.verify, self.skip_corrupt = verify, skip_corrupt
        self.worker_states, self.rotation = worker_states, rotation

    def _choices(self, g: int, start: int) -> Iterator[int]:
        """Source index of the worker's draws start, start + 1, ... (counter-based)."""
        chunk, offset = divmod(start, _BLEND_CHUNK)
        while True:
            u = np.random.default_rng([self.seed, g, chunk, 0xB1E]).random(_BLEND_CHUNK)
            for x in u[offset:]:
                yield int(np.searchsorted(self.weights, x, side="right"))
            chunk, offset = chunk + 1, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._batches()
        except ShardError as err:
            # Handed to the training process as a message: a DataLoader would wrap it in the worker's traceback.
            yield {"error": str(err)}

    def _batches(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        w = ((info.id if info else 0) + self.rotation) % self.workers  # this reader's logical index
        g = self.dp_rank * self.workers + w
        saved = self.worker_states[w] or {}
        states = [_SourceState(**s) for s in saved.get("sources", [{} for _ in self.sets])]
        draws = int(saved.get("draws", 0))
        streams = [
            _SourceStream(
                s.splits["train"],
                dtype=s.dtype,
                sample_tokens=s.seq_len + 1,
                seed=self.seed + 7919 * k,  # datasets of a blend are shuffled independently
                worker=g,
                workers=self.workers * self.dp_size,
                buffer=self.buffer,
                verify=self.verify,
                skip_corrupt=self.skip_corrupt,
                name=str(s.root),
            ).samples(states[k])
            for k, s in enumerate(self.sets)
        ]
        choices = self._choices(g, draws) if len(self.sets) > 1 else None
        while True:
            rows = []
            for _ in range(self.micro_batch_size):
                k = next(choices) if choices is not None else 0
                rows.append(next(streams[k]))
                draws += 1
            state = {"sources": [vars(s).copy() for s in states], "draws": draws}
            tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
            yield {"tokens": tokens, "worker": w, "state": state}


class ShardLoader:
    """Endless micro-batches for one data-parallel rank from prepared shards; `state_dict` resumes exactly.

    The interface matches `PackedSequenceLoader` (`next_step`, `state_dict`, `load_state_dict`).
    """

    def __init__(
        self,
        sets: list[ShardSet],
        weights: list[float],
        *,
        micro_batch_size: int,
        global_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 2,
        shuffle_buffer: int = 1024,
        verify_checksums: bool = True,
        skip_corrupt_shards: bool = False,
    ) -> None:
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} is not a multiple of micro_batch_size * dp_size"
            )
        self.sets, self.weights = sets, weights
        self.micro_batch_size = micro_batch_size
        self.micro_batches_per_step = global_batch_size // (micro_batch_size * dp_size)
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.verify, self.skip_corrupt = verify_checksums, skip_corrupt_shards
        self.workers = max(1, num_workers)
        for s in sets:  # a layout the data cannot serve fails here, before the model is built
            epoch_pieces(s.splits["train"], self.workers * dp_size, str(s.root))
        self._states: list[dict[str, Any] | None] = [None] * self.workers
        self._batches = 0
        self._iter: Iterator[dict[str, Any]] | None = None

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "dp_size": self.dp_size,
            "num_workers": self.num_workers,
            "micro_batch_size": self.micro_batch_size,
            "shuffle_buffer": self.shuffle_buffer,
            "datasets": [
                [w, str(s.root), s.tokenizer_sha256] for w, s in zip(self.weights, self.sets, strict=True)
            ],
        }

    def _start(self) -> Iterator[dict[str, Any]]:
        stream = ShardStream(
            self.sets,
            self.weights,
            seed=self.seed,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            num_workers=self.num_workers,
            micro_batch_size=self.micro_batch_size,
            buffer=self.shuffle_buffer,
            verify=self.verify,
            skip_corrupt=self.skip_corrupt,
            worker_states=list(self._states),
            rotation=self._batches % self.workers,
        )
        if self.num_workers == 0:
            return iter(stream)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, prefetch_factor=4)
        return iter(loader)

    def next_batch(self) -> torch.Tensor:
        if self._iter is None:
            self._iter = self._start()
        item = next(self._iter)
        if "error" in item:
            raise ShardError(item["error"])
        self._states[item["worker"]] = item["state"]
        self._batches += 1
        return item["tokens"]

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches for one optimizer step."""
        return [self.next_batch() for _ in range(self.micro_batches_per_step)]

    @property
    def skipped_shards(self) -> int:
        """Corrupt shards skipped so far (data.skip_corrupt_shards); a shard shared by several readers (sample
        ranges) counts once for each reader that met it."""
        return sum(src["skipped"] for s in self._states if s for src in s["sources"])

    def state_dict(self) -> dict[str, Any]:
        """This rank's position; `combine_states` joins those of all dp ranks into what a checkpoint holds."""
        return {
            "kind": "shards",
            "batches": self._batches,
            "dp_rank": self.dp_rank,
            "workers": list(self._states),  # each state is a fresh dict per batch, never changed after
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's position at the saved layout. Takes `combine_states`'s state of all
        dp ranks, a single rank's `state_dict` at dp 1, or the state of dp rank 0 alone of an older checkpoint."""
        if state.get("kind") != "shards":
            raise ValueError(
                "the saved loader state is not a shard loader's: data.path changed since the save"
            )
        saved, now = state["fingerprint"], self._fingerprint()
        changed = [k for k in now if saved.get(k) != now[k]]
        if changed:
            raise ValueError(
                "the data order cannot continue exactly: "
                + ", ".join(f"{k} was {saved.get(k)!r}, now {now[k]!r}" for k in changed)
                + " (resume with the saved data settings and data-parallel size)"
            )
        self._states = list(self._own_states(state, _saved_ranks(state)))
        self._batches = int(state["batches"])
        self._iter = None

    def _own_states(self, state: dict[str, Any], ranks: list[list[Any] | None]) -> list[Any]:
        """This rank's saved reader states (the layout is unchanged)."""
        own = ranks[self.dp_rank]
        if own is not None:
            return own
        if "dp_rank" in state:
            raise ValueError(
                f"the saved loader state holds the data position of data-parallel rank {state['dp_rank']} only, "
                f"not of rank {self.dp_rank}: save the state of every rank (source.gather_loader_state)"
            )
        log.warning(
            "the checkpoint records the data position of data-parallel rank 0 only (saved before the positions "
            "of all ranks were recorded): data-parallel rank %d continues from rank 0's reader positions",
            self.dp_rank,
        )
        return state["workers"]


def _saved_ranks(state: dict[str, Any]) -> list[list[Any] | None]:
    """Per saved dp rank, its reader states; None for a rank the state does not hold."""
    if "ranks" in state:
        return state["ranks"]
    ranks: list[list[Any] | None] = [None] * int(state["fingerprint"]["dp_size"])
    ranks[int(state.get("dp_rank", 0))] = state["workers"]
    return ranks


def combine_states(local: dict[str, Any], ranks: list[list[Any]]) -> dict[str, Any]:
    """The loader state of all dp ranks, what a checkpoint records: one rank's `state_dict` with the
    reader states of every dp rank (`ranks`, in dp-rank order) in place of its own."""
    state = {k: v for k, v in local.items() if k not in ("dp_rank", "workers")}
    state["ranks"] = [list(workers) for workers in ranks]
    return state


def valid_batches(
    sets: list[ShardSet],
    micro_batch_size: int,
    num_batches: int,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
    verify: bool = True,
) -> list[torch.Tensor]:
    """A fixed list of held-out micro-batches: the first samples of the valid splits (datasets in the order
    of data.path, shards in manifest order); rank k takes every dp-th batch starting at k. Empty when the
    valid splits hold fewer than one micro-batch per rank (`valid_shortfall` says so in words)."""
    want = num_batches * micro_batch_size
    rows: list[np.ndarray] = []
    for s in sets:
        for info in s.splits["valid"]:
            for sample in read_shard(info, s.dtype, s.seq_len + 1, verify=verify):
                rows.append(sample)
                if len(rows) == want:
                    break
            if len(rows) == want:
                break
    count = len(rows) // micro_batch_size
    count -= count % dp_size
    if count < dp_size:
        return []
    batches = torch.from_numpy(np.stack(rows[: count * micro_batch_size]).astype(np.int64)).split(
        micro_batch_size
    )
    return list(batches[dp_rank::dp_size])


def valid_shortfall(sets: list[ShardSet], micro_batch_size: int, dp_size: int) -> str | None:
    """Why `valid_batches` is empty, or None when it is not."""
    samples = sum(info.sequences for s in sets for info in s.splits["valid"])
    if samples >= micro_batch_size * dp_size:
        return None
    return (
        f"the valid splits of {', '.join(str(s.root) for s in sets)} hold {samples} samples, fewer than one "
        f"micro-batch per data-parallel rank ({dp_size} × {micro_batch_size})"
    )
