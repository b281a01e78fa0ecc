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

Elastic resume. At another dp size or `data.num_workers` the saved readers' positions do not fit the new
readers. Which sample ids the saved readers consumed is replayed from the manifest's sample counts and the
seeds, without reading a shard (`shard_resume.py`). Each dataset restarts at the earliest epoch a saved reader
was in, and in that epoch and every later one the new readers skip the ids consumed before the save (packed
per-epoch masks, kept in the state until every reader has passed their epoch, and joined with what the new
readers take at a further change). Every sample of an epoch is thus taken once across the change. The blend
draws of the new readers are salted with the count of such changes (`generation`), so they do not repeat the
old readers' draws.
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
from cpmtp_dist.data.shard_resume import consumed_before, decode_mask, encode_mask, excluded

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


def split_offsets(shards: list[ShardInfo]) -> np.ndarray:
    """The first sample id of each shard, and the split's size last: ids count samples over the shards."""
    return np.cumsum([0] + [info.sequences for info in shards], dtype=np.int64)


def source_seed(seed: int, k: int) -> int:
    """The seed of dataset k of a blend: datasets are shuffled independently."""
    return seed + 7919 * k


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
        masks: dict[int, np.ndarray] | None = None,
    ) -> None:
        self.pieces = epoch_pieces(shards, workers, name)
        self.shards, self.dtype, self.sample_tokens = shards, dtype, sample_tokens
        self.seed, self.worker, self.workers, self.buffer = seed, worker, workers, max(1, buffer)
        self.verify, self.skip_corrupt, self.name = verify, skip_corrupt, name
        self.offsets = split_offsets(shards)
        self.masks = masks or {}  # epoch -> packed ids consumed before a layout change (shard_resume.py)

    def _epoch_samples(self, epoch: int, state: _SourceState) -> Iterator[np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pieces))
        rng = np.random.default_rng([self.seed, epoch, self.worker])
        mask = self.masks.get(epoch)
        buf: list[np.ndarray] = []
        for index in order[self.worker :: self.workers]:
            shard, first, stop = self.pieces[int(index)]
            info = self.shards[shard]
            skip = None if mask is None else excluded(mask, self.offsets[shard] + np.arange(first, stop))
            if skip is not None and skip.all():
                continue  # consumed before a layout change: not opened
            try:
                samples = read_shard(
                    info, self.dtype, self.sample_tokens, verify=self.verify, first=first, stop=stop
                )
                for i, sample in enumerate(samples):
                    if skip is not None and skip[i]:
                        continue
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
            if produced == 0 and epoch not in self.masks:  # else all its samples may have been consumed
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
        generation: int = 0,
        masks: list[dict[int, np.ndarray]] | None = None,
    ) -> None:
        self.sets, self.weights = sets, np.cumsum(weights) / np.sum(weights)
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.workers = max(1, num_workers)
        self.micro_batch_size, self.buffer = micro_batch_size, buffer
        self.verify, self.skip_corrupt = verify, skip_corrupt
        self.worker_states, self.rotation = worker_states, rotation
        self.generation, self.masks = generation, masks or [{} for _ in sets]

    def _choices(self, g: int, start: int) -> Iterator[int]:
        """Source index of the worker's draws start, start + 1, ... (counter-based). After a layout change
        (generation > 0) the draws are salted with the generation: new readers do not repeat old ones' draws."""
        chunk, offset = divmod(start, _BLEND_CHUNK)
        salt = [self.generation] if self.generation else []
        while True:
            u = np.random.default_rng([self.seed, g, chunk, 0xB1E, *salt]).random(_BLEND_CHUNK)
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
                seed=source_seed(self.seed, k),
                worker=g,
                workers=self.workers * self.dp_size,
                buffer=self.buffer,
                verify=self.verify,
                skip_corrupt=self.skip_corrupt,
                name=str(s.root),
                masks=self.masks[k],
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
        self._generation = 0  # layout changes so far (elastic resumes)
        self._masks: list[dict[int, np.ndarray]] = [{} for _ in sets]  # per dataset: epoch -> consumed ids
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
            generation=self._generation,
            masks=self._masks,
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
        state = {
            "kind": "shards",
            "batches": self._batches,  # since the readers started: after a layout change, from 0
            "dp_rank": self.dp_rank,
            "workers": list(self._states),  # each state is a fresh dict per batch, never changed after
            "fingerprint": self._fingerprint(),
        }
        if self._generation:
            masks = [{str(e): encode_mask(m) for e, m in by_epoch.items()} for by_epoch in self._masks]
            state["elastic"] = {"generation": self._generation, "masks": masks}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint's position: exactly at the saved layout, elastically at another dp
        size or data.num_workers (`_restart`). Takes `combine_states`'s state of all dp ranks, a single
        rank's `state_dict` at dp 1, or the state of dp rank 0 alone of an older checkpoint."""
        if state.get("kind") != "shards":
            raise ValueError(
                "the saved loader state is not a shard loader's: data.path changed since the save"
            )
        saved, now = state["fingerprint"], self._fingerprint()
        changed = [k for k in now if saved.get(k) != now[k]]
        fixed = [k for k in changed if k not in _LAYOUT]
        if fixed:
            raise ValueError(
                "the data order cannot continue exactly: "
                + ", ".join(f"{_SETTINGS[k]} was {saved.get(k)!r}, now {now[k]!r}" for k in fixed)
                + " (resume with the saved values; the data-parallel size and data.num_workers may change)"
            )
        elastic = state.get("elastic") or {"generation": 0, "masks": [{} for _ in self.sets]}
        generation = int(elastic["generation"])
        masks = [
            {
                int(e): decode_mask(text, int(split_offsets(s.splits["train"])[-1]), str(s.root))
                for e, text in m.items()
            }
            for s, m in zip(self.sets, elastic["masks"], strict=True)
        ]
        ranks = _saved_ranks(state)
        if changed:
            states, masks = self._restart(ranks, saved, masks)
            generation, batches = generation + 1, 0
        else:
            states, batches = self._own_states(state, ranks), int(state["batches"])
        self._states, self._batches, self._generation, self._masks = list(states), batches, generation, masks
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

    def _restart(
        self, ranks: list[list[Any] | None], saved: dict[str, Any], masks: list[dict[int, np.ndarray]]
    ) -> tuple[list[dict[str, Any]], list[dict[int, np.ndarray]]]:
        """The reader states and consumed-id masks that continue a position saved at another dp size or
        data.num_workers: every dataset restarts at the earliest epoch a saved reader was in, and in it and
        every later epoch the new readers skip the ids consumed before the save (`shard_resume.py`)."""
        was = f"the data-parallel size {saved['dp_size']} and data.num_workers={saved['num_workers']}"
        if any(rank is None for rank in ranks):
            raise ValueError(
                "the checkpoint records the data position of data-parallel rank 0 only (saved before the "
                f"positions of all ranks were recorded), so it cannot continue at another layout: resume with {was}"
            )
        readers = [reader or {} for rank in ranks for reader in rank]  # global reader g = r * W + w
        if len(readers) != saved["dp_size"] * max(1, saved["num_workers"]):
            raise ValueError(
                f"the saved loader state holds {len(readers)} reader states, not one per reader of {was}: "
                "the checkpoint's meta.json is damaged; resume from another checkpoint"
            )
        skipped = sum(src["skipped"] for reader in readers for src in reader.get("sources", []))
        if skipped:
            raise ValueError(
                f"{skipped} corrupt shard(s) were skipped before the save (data.skip_corrupt_shards=true), so "
                f"which samples were consumed is not known exactly: resume with {was}"
            )
        starts, consumed = [], []
        for k, s in enumerate(self.sets):
            shards = s.splits["train"]
            positions = [
                (r["sources"][k]["epoch"], r["sources"][k]["position"]) if r else (0, 0) for r in readers
            ]
            start, by_epoch = consumed_before(
                epoch_pieces(shards, len(readers), str(s.root)),
                split_offsets(shards),
                seed=source_seed(self.seed, k),
                buffer=max(1, self.shuffle_buffer),
                positions=positions,
                masks=masks[k],
            )
            starts.append(start)
            consumed.append(by_epoch)
        log.info(
            "data: %d × %d readers continue the position of %d × %d (epochs %s, without the samples consumed "
            "before the save)",
            self.dp_size, self.workers, saved["dp_size"], max(1, saved["num_workers"]), starts,
        )  # fmt: skip
        fresh = {"sources": [{"epoch": e, "position": 0, "skipped": 0} for e in starts], "draws": 0}
        return [json.loads(json.dumps(fresh)) for _ in range(self.workers)], consumed


_LAYOUT = ("dp_size", "num_workers")
"""The fingerprint's entries a resume may change: the readers restart elastically (`ShardLoader._restart`)."""
_SETTINGS = {
    "seed": "train.seed",
    "dp_size": "the data-parallel size",
    "num_workers": "data.num_workers",
    "micro_batch_size": "train.micro_batch_size",
    "shuffle_buffer": "data.shuffle_buffer",
    "datasets": "data.path (weights, folders, tokenizers)",
}


def _saved_ranks(state: dict[str, Any]) -> list[list[Any] | None]:
    """Per saved dp rank, its reader states; None for a rank the state does not hold."""
    if "ranks" in state:
        return state["ranks"]
    ranks: list[list[Any] | None] = [None] * int(state["fingerprint"]["dp_size"])
    ranks[int(state.get("dp_rank", 0))] = state["workers"]
    return ranks


def combine_states(local: dict[str, Any], ranks: list[list[Any]]) -> dict[str, Any]:
    """The loader state of all dp ranks, what a checkpoint records: one rank's `state_dict` with the
    reader states of every dp rank (`ranks`, in dp-rank order) in place of its own. Consumed-id masks of
    epochs that every reader has finished are dropped."""
    state = {k: v for k, v in local.items() if k not in ("dp_rank", "workers")}
    state["ranks"] = [list(workers) for workers in ranks]
    if "elastic" in state:
        readers = [reader for workers in ranks for reader in workers]
        masks = []
        for k, by_epoch in enumerate(state["elastic"]["masks"]):
            start = min(r["sources"][k]["epoch"] if r else 0 for r in readers)
            masks.append({e: m for e, m in by_epoch.items() if int(e) >= start})
        state["elastic"] = state["elastic"] | {"masks": masks}
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
