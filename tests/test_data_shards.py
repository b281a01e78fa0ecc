"""The streaming shard loader: split by rank and worker, deterministic order, exact resume (also at another
dp size or data.num_workers), blends, bad input.

Shards are written here directly in the documented format (webdataset tars of `.tokens.npy` samples plus a
manifest), each sample tagged with its index and dataset, so that every read sample can be identified.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds

from cpmtp_dist.data import source
from cpmtp_dist.data.data_path import ShardError, parse_data_path
from cpmtp_dist.data.shard_resume import buffer_order, epoch_ids
from cpmtp_dist.data.shards import (
    FORMAT,
    ShardLoader,
    ShardSet,
    _SourceState,
    _SourceStream,
    combine_states,
    epoch_pieces,
    split_offsets,
    valid_batches,
)

L = 7  # seq_len: samples hold L + 1 tokens


def write_dataset(root: Path, shards: int, per_shard: int, tag: int = 0, valid: int = 6) -> ShardSet:
    """`shards` train shards of `per_shard` samples; sample i is [i, tag, 0, ...]."""
    root.mkdir(parents=True)
    (root / "tokenizer").mkdir()
    splits = {}
    for split, counts in (("train", [per_shard] * shards), ("valid", [valid])):
        (root / split).mkdir()
        entries, index = [], 0
        for k, count in enumerate(counts):
            rel = f"{split}/shard-{k:06d}.tar"
            with wds.TarWriter(str(root / rel)) as sink:
                for _ in range(count):
                    arr = np.zeros(L + 1, dtype=np.uint16)
                    arr[0], arr[1] = index, tag
                    buf = io.BytesIO()
                    np.save(buf, arr)
                    sink.write({"__key__": f"{index:09d}", "tokens.npy": buf.getvalue()})
                    index += 1
            data = (root / rel).read_bytes()
            entries.append(
                {
                    "file": rel,
                    "sequences": count,
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            )
        splits[split] = {"sequences": index, "tokens": index * (L + 1), "shards": entries}
    manifest = {
        "format": FORMAT,
        "seq_len": L,
        "sample_tokens": L + 1,
        "dtype": "uint16",
        "tokenizer": {"dir": "tokenizer", "sha256": "ab" * 32, "vocab_size": 300, "eos_id": 1, "pad_id": 2},
        "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return ShardSet.load(root)


def loader(sets, weights=None, **kw) -> ShardLoader:
    args = {"micro_batch_size": 2, "seed": 0, "num_workers": 2, "shuffle_buffer": 3} | kw
    args.setdefault("global_batch_size", args["micro_batch_size"] * args.get("dp_size", 1))
    return ShardLoader(sets, weights or [1.0] * len(sets), **args)


def ids(batches: list[torch.Tensor]) -> list[int]:
    return [int(x) for b in batches for x in b[:, 0]]


def take(shard_loader: ShardLoader, count: int) -> list[int]:
    return ids([shard_loader.next_batch() for _ in range(count)])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> ShardSet:
    return write_dataset(tmp_path_factory.mktemp("d") / "a", shards=8, per_shard=5)


def test_ranks_and_workers_read_disjoint_parts_whose_union_is_the_split(data):
    # One epoch of each of dp 2 x 2 workers: every sample exactly once.
    seen = []
    for g in range(4):
        stream = _SourceStream(
            data.splits["train"],
            dtype=data.dtype,
            sample_tokens=L + 1,
            seed=0,
            worker=g,
            workers=4,
            buffer=3,
            verify=True,
            skip_corrupt=False,
            name="a",
        )
        seen.append([int(s[0]) for s in stream._epoch_samples(0, _SourceState())])
    assert sorted(x for part in seen for x in part) == list(range(40))
    assert all(len(part) == 10 for part in seen)
    # Through the real DataLoader (2 worker processes per rank): the ranks' first 10 batches are disjoint.
    got = {r: take(loader([data], dp_rank=r, dp_size=2), 10) for r in (0, 1)}
    assert len(set(got[0])) == 20 and len(set(got[1])) == 20 and not set(got[0]) & set(got[1])


def test_same_seed_same_order_other_seed_other_order(data):
    a = take(loader([data]), 12)
    b = take(loader([data]), 12)
    c = take(loader([data], seed=1), 12)
    assert a == b and a != c
    inline = take(loader([data], num_workers=0), 12)
    assert sorted(inline[:10]) != inline[:10]  # shuffled


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_k_batches_equals_the_uninterrupted_stream(data, num_workers):
    # 40 samples, 2 per batch: one epoch is 20 batches; k = 27 resumes inside the second epoch.
    total = 34
    whole = loader([data], num_workers=num_workers)
    ref = take(whole, total)
    assert sorted(ref[:40]) == list(range(40))  # the first epoch is all samples, once
    for k in (1, 3, 20, 27):
        first = loader([data], num_workers=num_workers)
        head = [first.next_batch() for _ in range(k)]
        state = json.loads(json.dumps(first.state_dict()))  # as it travels in a checkpoint
        resumed = loader([data], num_workers=num_workers)
        resumed.load_state_dict(state)
        tail = [resumed.next_batch() for _ in range(total - k)]
        assert ids(head) + ids(tail) == ref, k


def test_resume_refuses_changed_data_settings_and_names_them(data):
    first = loader([data])
    first.next_batch()
    state = first.state_dict()
    for change, message in (
        ({"seed": 1}, "train.seed was 0, now 1"),
        ({"shuffle_buffer": 4}, "data.shuffle_buffer was 3, now 4"),
        ({"micro_batch_size": 1}, "train.micro_batch_size was 2, now 1"),
    ):
        with pytest.raises(
            ValueError, match=message + r".*the data-parallel size and data.num_workers may change"
        ):
            loader([data], **change).load_state_dict(state)


# ---- resume at another layout (dp size × data.num_workers) ---------------------------------------
def run_layout(sets, dp: int, workers: int, batches: int, state=None, **kw):
    """`batches` micro-batches of one sample on each of `dp` ranks with `workers` loader workers, resumed
    from `state`: the (dataset, epoch, sample id) of each sample taken, and the state of all ranks after."""
    ranks = [
        loader(sets, dp_rank=r, dp_size=dp, num_workers=workers, micro_batch_size=1, **kw) for r in range(dp)
    ]
    taken = []
    for rank in ranks:
        if state is not None:
            rank.load_state_dict(state)
        for _ in range(batches):
            before = list(rank._states)
            batch = rank.next_batch()
            (now,) = [
                s for s, b in zip(rank._states, before, strict=True) if s is not b
            ]  # its reader's state
            k = int(batch[0, 1])  # the dataset's tag
            taken.append((k, now["sources"][k]["epoch"], int(batch[0, 0])))
    combined = combine_states(ranks[0].state_dict(), [rank.state_dict()["workers"] for rank in ranks])
    return taken, json.loads(json.dumps(combined))  # as it travels in a checkpoint


def reader_epochs(state) -> list[int]:
    return [reader["sources"][0]["epoch"] for workers in state["ranks"] for reader in workers]


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> ShardSet:
    """3 shards of 5 samples: 4 readers get ranges of 2 or 3 samples, 2 readers 2 shards and 1."""
    return write_dataset(tmp_path_factory.mktemp("u") / "u", shards=3, per_shard=5)


def test_resume_at_other_layouts_takes_every_sample_of_an_epoch_once(uneven):
    # 2 ranks x 2 workers -> 1 rank x 1 worker -> 2 ranks x 0 workers, 15 samples an epoch.
    a, state = run_layout([uneven], 2, 2, 6)
    epochs = reader_epochs(state)
    assert 1 in epochs and 0 in epochs, epochs  # a reader has crossed into epoch 1, others have not
    b, state = run_layout([uneven], 1, 1, 4, state)
    assert reader_epochs(state) == [0]
    c, state = run_layout([uneven], 2, 0, 16, state)
    assert min(reader_epochs(state)) >= 2  # epochs 0 and 1 are complete
    taken = a + b + c
    for epoch in (0, 1):
        assert sorted(i for _, e, i in taken if e == epoch) == list(range(15)), epoch  # each sample once
    later = [i for _, e, i in taken if e == 2]
    assert later and len(later) == len(set(later))
    # A same-layout resume after a change (masks in the state) continues exactly.
    ref, _ = run_layout([uneven], 2, 0, 10, state)
    head, mid = run_layout([uneven], 2, 0, 3, state)
    tail, _ = run_layout([uneven], 2, 0, 7, mid)
    assert sorted(head + tail) == sorted(ref)
    per_rank = [head[:3] + tail[:7], head[3:] + tail[7:]]
    assert per_rank == [ref[:10], ref[10:]]


def test_same_layout_resume_of_every_rank_equals_the_uninterrupted_streams(uneven, monkeypatch):
    """What a checkpoint records (`source.gather_loader_state`, here over a world of tp 2 x dp 2 with the
    collective faked) resumes each rank's own readers, also when they are in different epochs. A state of
    dp rank 0 alone, what older checkpoints recorded, does not continue rank 1's stream."""
    total, k = 20, 12
    ref = [take(loader([uneven], dp_rank=r, dp_size=2, micro_batch_size=1), total) for r in (0, 1)]
    ranks = [loader([uneven], dp_rank=r, dp_size=2, micro_batch_size=1) for r in (0, 1)]
    for rank in ranks:
        take(rank, k)
    world = [(r // 2, ranks[r // 2]) for r in range(4)]  # global rank -> (dp rank, its loader), tp peers

    def all_gather_object(out, obj):
        out[:] = [(dp_rank, rank.state_dict()["workers"]) for dp_rank, rank in world]

    monkeypatch.setattr(source.dist, "all_gather_object", all_gather_object)
    groups = SimpleNamespace(rank=0, world_size=4, dp_rank=0, dp_size=2)
    state = json.loads(json.dumps(source.gather_loader_state(ranks[0], groups)))
    assert len({w["sources"][0]["epoch"] for workers in state["ranks"] for w in workers}) == 2  # 0 and 1
    for r in (0, 1):
        resumed = loader([uneven], dp_rank=r, dp_size=2, micro_batch_size=1)
        resumed.load_state_dict(state)
        assert ref[r][:k] + take(resumed, total - k) == ref[r], r
    old = ranks[0].state_dict()
    del old["dp_rank"]
    resumed = loader([uneven], dp_rank=1, dp_size=2, micro_batch_size=1)
    resumed.load_state_dict(old)
    assert ref[1][:k] + take(resumed, total - k) != ref[1]
    with pytest.raises(ValueError, match="data-parallel rank 0 only.*resume with the data-parallel size 2"):
        loader([uneven], num_workers=1, micro_batch_size=1).load_state_dict(old)


def test_resume_at_another_layout_is_refused_after_skipped_shards(uneven):
    _, state = run_layout([uneven], 2, 0, 3)
    state["ranks"][1][0]["sources"][0]["skipped"] = 1
    with pytest.raises(ValueError, match=r"data.skip_corrupt_shards=true.*resume with the data-parallel size 2 "
                       "and data.num_workers=0"):  # fmt: skip
        loader([uneven], num_workers=0, micro_batch_size=1).load_state_dict(state)


@pytest.mark.parametrize(("buffer", "epoch"), [(1, 0), (3, 1), (100, 2)])
def test_the_replay_on_ids_is_the_order_of_the_stream(uneven, buffer, epoch):
    shards = uneven.splits["train"]
    mask = np.packbits(np.arange(15) % 4 == 1)  # samples consumed before a layout change
    for g in range(4):
        for masks in ({}, {epoch: mask}):
            stream = _SourceStream(
                shards, dtype=uneven.dtype, sample_tokens=L + 1, seed=5, worker=g, workers=4, buffer=buffer,
                verify=False, skip_corrupt=False, name="u", masks=masks,
            )  # fmt: skip
            read = [int(x[0]) for x in stream._epoch_samples(epoch, _SourceState())]
            replayed = epoch_ids(
                epoch_pieces(shards, 4, "u"), split_offsets(shards), seed=5, epoch=epoch, reader=g, readers=4,
                buffer=buffer, mask=masks.get(epoch),
            )  # fmt: skip
            assert read == replayed.tolist(), (g, masks)
    ids = np.arange(500) * 7
    buf, out = [], []
    rng = np.random.default_rng(3)
    for x in ids.tolist():  # the stream's own loop
        if len(buf) < 16:
            buf.append(x)
            continue
        j = int(rng.integers(16))
        buf[j], x = x, buf[j]
        out.append(x)
    rng.shuffle(buf)
    assert buffer_order(ids, 16, np.random.default_rng(3)).tolist() == out + buf


def test_blend_proportions(tmp_path):
    a = write_dataset(tmp_path / "a", shards=4, per_shard=50, tag=0)
    b = write_dataset(tmp_path / "b", shards=4, per_shard=50, tag=1)
    blend = loader([a, b], [0.8, 0.2], num_workers=0, micro_batch_size=10, global_batch_size=10)
    rows = torch.cat([blend.next_batch() for _ in range(300)])
    share_b = float((rows[:, 1] == 1).float().mean())
    assert abs(share_b - 0.2) < 0.03, share_b
    # At another layout the readers draw afresh: the proportions hold, and no sample of an epoch repeats.
    before, state = run_layout([a, b], 2, 0, 40, weights=[0.8, 0.2])
    after, _ = run_layout([a, b], 1, 0, 1500, state, weights=[0.8, 0.2])
    share_b = sum(k for k, _, _ in after) / len(after)
    assert abs(share_b - 0.2) < 0.035, share_b  # 3.4 standard deviations
    for k in (0, 1):
        for e in {e for kk, e, _ in before + after if kk == k}:
            got = [i for kk, ee, i in before + after if (kk, ee) == (k, e)]
            assert len(got) == len(set(got)), (k, e)
    assert parse_data_path("0.8 /x 0.2 /y") == [(0.8, "/x"), (0.2, "/y")]
    assert parse_data_path("/only") == [(1.0, "/only")]


def test_valid_batches_are_fixed_and_split_over_ranks(data):
    v0 = valid_batches([data], micro_batch_size=1, num_batches=4, dp_rank=0, dp_size=2)
    v1 = valid_batches([data], micro_batch_size=1, num_batches=4, dp_rank=1, dp_size=2)
    assert ids(v0) == [0, 2] and ids(v1) == [1, 3]


# ---- bad input ----------------------------------------------------------------------------------
def test_missing_manifest_and_shard(tmp_path):
    with pytest.raises(ShardError, match="manifest.json does not exist"):
        ShardSet.load(tmp_path)
    write_dataset(tmp_path / "d", shards=2, per_shard=3)
    (tmp_path / "d" / "train" / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"shard-000001.tar is listed in .* but missing"):
        ShardSet.load(tmp_path / "d")


def test_truncated_shard(tmp_path):
    write_dataset(tmp_path / "d", shards=2, per_shard=3)
    path = tmp_path / "d" / "train" / "shard-000000.tar"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ShardError, match="shard-000000.tar has 1000 bytes.*truncated"):
        ShardSet.load(tmp_path / "d")


def corrupt(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[700] ^= 0xFF  # inside the first sample's data: same size, other content
    path.write_bytes(bytes(raw))


def test_checksum_mismatch_stops_or_is_skipped_and_counted(tmp_path, caplog):
    data = write_dataset(tmp_path / "d", shards=2, per_shard=3)
    corrupt(tmp_path / "d" / "train" / "shard-000000.tar")
    with pytest.raises(ShardError, match="shard-000000.tar: sha256 .* differs from the manifest"):
        loader([data], num_workers=0).next_batch()
    # Met in a loader worker process: the same message, without the worker's traceback.
    with pytest.raises(ShardError, match="shard-000000.tar: sha256 .* differs from the manifest") as err:
        take(loader([data], num_workers=2), 2)
    assert "Traceback" not in str(err.value)
    skipping = loader([data], num_workers=0, skip_corrupt_shards=True, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING):
        got = take(skipping, 3)
    assert set(got) <= {3, 4, 5}  # only the good shard, epoch after epoch
    assert skipping.skipped_shards >= 1
    assert "skipping a corrupt shard" in caplog.text


def test_unreadable_shard_without_checksums(tmp_path):
    data = write_dataset(tmp_path / "d", shards=1, per_shard=3)
    path = tmp_path / "d" / "train" / "shard-000000.tar"
    raw = bytearray(path.read_bytes())
    raw[0:512] = b"\0" * 512  # the first tar header
    path.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match="shard-000000.tar"):
        loader([data], num_workers=0, verify_checksums=False).next_batch()


def test_tokenizer_mismatch_and_bad_blend_spec(data):
    with pytest.raises(ShardError, match="tokenised with tokenizer sha256 abababab"):
        data.check_tokenizer("cd" * 32)
    with pytest.raises(ShardError, match="weight/folder pairs"):
        parse_data_path("0.5 /x 0.5")
    with pytest.raises(ShardError, match="must be > 0"):
        parse_data_path("0 /x 1 /y")


def test_fewer_shards_than_readers_share_shards_by_sample_ranges(tmp_path):
    # 3 shards of 5 samples for dp 2 x 2 workers = 4 readers: every shard is cut into 2 ranges (6 units).
    data = write_dataset(tmp_path / "d", shards=3, per_shard=5)
    assert epoch_pieces(data.splits["train"], 4, "d") == [
        (0, 0, 2), (0, 2, 5), (1, 0, 2), (1, 2, 5), (2, 0, 2), (2, 2, 5)
    ]  # fmt: skip
    assert epoch_pieces(data.splits["train"], 3, "d") == [(0, 0, 5), (1, 0, 5), (2, 0, 5)]  # whole shards
    for epoch in (0, 1):
        seen = []
        for g in range(4):
            stream = _SourceStream(
                data.splits["train"], dtype=data.dtype, sample_tokens=L + 1, seed=0, worker=g, workers=4,
                buffer=3, verify=True, skip_corrupt=False, name="d",
            )  # fmt: skip
            seen.append([int(s[0]) for s in stream._epoch_samples(epoch, _SourceState())])
        assert sorted(x for part in seen for x in part) == list(range(15)) and all(seen), (epoch, seen)
    # One shard of 9 samples for 4 readers (a first run on a small corpus): ranges of 2, 2, 2 and 3.
    one = write_dataset(tmp_path / "one", shards=1, per_shard=9)
    assert epoch_pieces(one.splits["train"], 4, "one") == [(0, 0, 2), (0, 2, 4), (0, 4, 6), (0, 6, 9)]
    # Through real DataLoaders (2 worker processes per rank): the ranks' epochs are disjoint, and resume exact.
    # Every reader's range holds at least 2 samples: each rank's first 4 batches come from its own ranges.
    got = {r: take(loader([one], dp_rank=r, dp_size=2, micro_batch_size=1), 4) for r in (0, 1)}
    assert len(set(got[0])) == len(set(got[1])) == 4 and not set(got[0]) & set(got[1]), got
    total = 14
    ref = take(loader([one], micro_batch_size=1), total)
    for k in (3, 10):
        first = loader([one], micro_batch_size=1)
        head = [first.next_batch() for _ in range(k)]
        resumed = loader([one], micro_batch_size=1)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        assert ids(head) + ids([resumed.next_batch() for _ in range(total - k)]) == ref, k


def test_too_few_samples_for_the_readers_is_refused_when_the_loader_is_built(tmp_path):
    data = write_dataset(tmp_path / "d", shards=1, per_shard=3)
    with pytest.raises(ShardError, match=r"3 training samples for 4 readers .*lower data.num_workers") as err:
        loader([data], dp_size=2, num_workers=2)
    assert "\n" not in str(err.value)
