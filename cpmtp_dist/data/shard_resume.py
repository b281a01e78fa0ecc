"""Elastic resume of streamed shards: which samples the readers of a saved layout consumed, by sample id.

A reader's order within an epoch depends only on the manifest's sample counts and the seeds (see
`shards.py`): the units of the epoch permuted by a generator seeded with (seed, e), the reader's units in
that order, and the shuffle buffer's generator seeded with (seed, e, g). `epoch_ids` replays that order on
sample ids (the index of a sample in its split, shards in manifest order) without reading a shard, and
`consumed_before` collects, per epoch, the ids that the readers of a saved layout took before a checkpoint.
The readers of another layout then skip those ids (`excluded`): every sample of an epoch is still taken once.

Masks of consumed ids travel in the checkpoint as packed bits (`np.packbits`), zlib-compressed, base64 text.

Cost: the replay of one reader's epoch is a few numpy passes over its ids plus a sort (`buffer_order`); all
readers together replay each epoch between the slowest reader's and the fastest one's once, about a second
per ten million samples on one core, at the resume that changes the layout only.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Sequence

import numpy as np

Unit = tuple[int, int, int]
"""(shard, first, stop): samples first .. stop - 1 of a shard (`shards.epoch_pieces`)."""


def excluded(mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Whether each of `ids` is set in the packed bit mask `mask` (bool array shaped like `ids`)."""
    return ((mask[ids >> 3] >> (7 - (ids & 7))) & 1).astype(bool)


def encode_mask(mask: np.ndarray) -> str:
    """A packed bit mask as compact text for meta.json."""
    return base64.b64encode(zlib.compress(mask.tobytes(), 6)).decode("ascii")


def decode_mask(text: str, samples: int, name: str) -> np.ndarray:
    """`encode_mask`'s text back to a packed bit mask over a split of `samples` samples."""
    mask = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    if len(mask) != -(-samples // 8):
        raise ValueError(
            f"{name}: the checkpoint's data position was recorded for a train split of about {8 * len(mask)} "
            f"samples, the manifest lists {samples}: the dataset was rebuilt since the save; resume with the "
            "saved data (data.path)"
        )
    return mask.copy()  # writable


def buffer_order(ids: np.ndarray, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """The order in which a shuffle buffer of `buffer` slots passes on `ids`, drawing from `rng` as
    `shards._SourceStream` does: once full, each new id takes slot j = rng.integers(buffer) and the id that
    held it is passed on; at the end the remaining slots are shuffled with `rng`.

    Vectorised: the id passed on at step i is the one written into slot j[i] by the latest earlier step
    with the same slot, else the slot's initial id; a stable sort by slot finds those steps. (One vector
    draw of k integers gives the same numbers as k scalar draws and leaves the generator in the same state.)
    """
    if len(ids) <= buffer:
        rest = ids.copy()
        rng.shuffle(rest)
        return rest
    k = len(ids) - buffer
    slot = rng.integers(buffer, size=k)  # (k,)
    steps = np.argsort(slot, kind="stable")  # grouped by slot, steps ascending within a slot
    by_slot = slot[steps]
    follows = np.zeros(k, dtype=bool)  # the previous step in sorted order wrote the same slot
    follows[1:] = by_slot[1:] == by_slot[:-1]
    earlier = np.empty(k, dtype=np.int64)
    earlier[0], earlier[1:] = -1, steps[:-1]
    passed = np.empty(k, dtype=ids.dtype)
    passed[steps] = ids[np.where(follows, buffer + earlier, by_slot)]
    rest = ids[:buffer].copy()
    last = np.ones(k, dtype=bool)  # the last write of each slot
    last[:-1] = ~follows[1:]
    rest[by_slot[last]] = ids[buffer + steps[last]]
    rng.shuffle(rest)
    return np.concatenate([passed, rest])


def epoch_ids(
    units: Sequence[Unit],
    offsets: np.ndarray,
    *,
    seed: int,
    epoch: int,
    reader: int,
    readers: int,
    buffer: int,
    mask: np.ndarray | None,
) -> np.ndarray:
    """The sample ids that reader `reader` of `readers` yields in `epoch`, in order: its units' ids (the
    shard's first id `offsets[shard]` plus the sample's index), without the ids set in `mask`, through the
    shuffle buffer. The same order as `shards._SourceStream._epoch_samples`, computed without reading."""
    order = np.random.default_rng([seed, epoch]).permutation(len(units))
    parts = [offsets[units[i][0]] + np.arange(units[i][1], units[i][2]) for i in order[reader::readers]]
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if mask is not None:
        ids = ids[~excluded(mask, ids)]
    return buffer_order(ids, max(1, buffer), np.random.default_rng([seed, epoch, reader]))


def consumed_before(
    units: Sequence[Unit],
    offsets: np.ndarray,
    *,
    seed: int,
    buffer: int,
    positions: Sequence[tuple[int, int]],
    masks: dict[int, np.ndarray],
) -> tuple[int, dict[int, np.ndarray]]:
    """The first epoch not finished by every reader of a saved layout, and per epoch from it on, the packed
    mask of the ids consumed before the save: by the readers (reader g at `positions[g]` = (epoch, samples
    taken in it) took all of its ids of earlier epochs and the first ones of its own), and by earlier layouts
    (`masks`, which those readers skipped)."""
    samples = int(offsets[-1])
    start = min(epoch for epoch, _ in positions)
    taken = {e: np.unpackbits(m, count=samples).astype(bool) for e, m in masks.items() if e >= start}
    for g, (epoch, position) in enumerate(positions):
        for e in range(start, epoch + 1):
            ids = epoch_ids(
                units, offsets, seed=seed, epoch=e, reader=g, readers=len(positions), buffer=buffer,
                mask=masks.get(e),
            )  # fmt: skip
            if e == epoch:
                if position > len(ids):
                    raise ValueError(
                        f"the saved data position of reader {g} ({position} samples into epoch {e}) is past "
                        f"the end of its epoch ({len(ids)} samples): the checkpoint does not fit this data"
                    )
                ids = ids[:position]
            taken.setdefault(e, np.zeros(samples, dtype=bool))[ids] = True
    return start, {e: np.packbits(m) for e, m in sorted(taken.items()) if m.any()}
