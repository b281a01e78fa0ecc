"""What the trainer reads: the built-in corpus in memory, or prepared shards streamed from disk.

- `data.path` unset: the built-in corpus (`data.corpus`) is tokenised once into memory (cached) and visited
  in a seeded global order that does not depend on the parallel layout (`loader.PackedSequenceLoader`).
  Made for small corpora and for comparing layouts.
- `data.path` set: one folder of shards, or a weighted blend of several, streamed by `shards.ShardLoader`
  (split by data-parallel rank and loader worker, exact resume).

Both give a tokenizer, a loader with `next_step()` / `state_dict()` / `load_state_dict()`, and a fixed list
of held-out micro-batches for this rank. What a checkpoint records of the loader is `gather_loader_state`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from cpmtp_dist.config import Config
from cpmtp_dist.data.builtin import build_builtin_data
from cpmtp_dist.data.data_path import ShardError, parse_data_path
from cpmtp_dist.data.loader import PackedSequenceLoader, eval_batches
from cpmtp_dist.data.shards import ShardLoader, ShardSet, combine_states, valid_batches, valid_shortfall
from cpmtp_dist.data.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from cpmtp_dist.parallel.state import ParallelGroups


@dataclass
class TrainingData:
    tokenizer: Tokenizer
    tokenizer_dir: Path
    loader: Any  # PackedSequenceLoader | ShardLoader
    valid: list[torch.Tensor]
    """This rank's held-out micro-batches; empty when the data holds too few (`shortfall` says so)."""
    description: str
    shortfall: str | None = None
    """Why `valid` is empty, or None."""


def build_training_data(cfg: Config, *, dp_rank: int, dp_size: int) -> TrainingData:
    """The data of `cfg` for data-parallel rank `dp_rank`; bad data fails here, before training starts."""
    t, seq_length = cfg.train, cfg.model.trunk.seq_length
    if cfg.data.path is None:
        data = build_builtin_data(cfg.data)
        if data.tokenizer.vocab_size > cfg.model.trunk.vocab_size:
            raise ValueError(
                f"the tokenizer has {data.tokenizer.vocab_size} tokens but model.trunk.vocab_size="
                f"{cfg.model.trunk.vocab_size}: raise model.trunk.vocab_size or lower data.tokenizer_vocab_size"
            )
        loader = PackedSequenceLoader(
            data.train_stream,
            seq_length,
            t.micro_batch_size,
            t.global_batch_size,
            seed=t.seed,
            dp_rank=dp_rank,
            dp_size=dp_size,
        )
        valid = eval_batches(
            data.valid_stream,
            seq_length,
            t.micro_batch_size,
            t.eval_batches,  # the same held-out set whatever the layout, shared out over dp ranks
            dp_rank=dp_rank,
            dp_size=dp_size,
        )
        desc = f"{cfg.data.corpus} in memory, {len(data.train_stream):,} training tokens"
        return TrainingData(data.tokenizer, data.tokenizer_dir, loader, valid, desc)

    blend = parse_data_path(cfg.data.path)
    sets = [ShardSet.load(path) for _, path in blend]
    tokenizer = load_tokenizer(sets[0].tokenizer_dir)
    for s in sets:
        s.check_tokenizer(tokenizer.fingerprint)
        if s.seq_len != seq_length:
            raise ShardError(
                f"{s.manifest_path}: the shards hold sequences of seq_len={s.seq_len}, but "
                f"model.trunk.seq_length={seq_length}: set model.trunk.seq_length={s.seq_len} or rebuild the "
                f"shards with --seq-len {seq_length}"
            )
    if tokenizer.vocab_size > cfg.model.trunk.vocab_size:
        raise ShardError(
            f"{sets[0].manifest_path}: the shards' tokenizer has {tokenizer.vocab_size} tokens but "
            f"model.trunk.vocab_size={cfg.model.trunk.vocab_size}: token ids would fall outside the embedding; "
            f"raise model.trunk.vocab_size to at least {tokenizer.vocab_size}"
        )
    d = cfg.data
    loader = ShardLoader(
        sets,
        [w for w, _ in blend],
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
        seed=t.seed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=d.num_workers,
        shuffle_buffer=d.shuffle_buffer,
        verify_checksums=d.verify_checksums,
        skip_corrupt_shards=d.skip_corrupt_shards,
    )
    valid = valid_batches(
        sets, t.micro_batch_size, t.eval_batches, dp_rank=dp_rank, dp_size=dp_size, verify=d.verify_checksums
    )
    sequences = sum(i.sequences for s in sets for i in s.splits["train"])
    desc = (
        f"{' + '.join(str(s.root) for s in sets)}: {sequences * (seq_length + 1):,} training tokens in shards"
    )
    shortfall = valid_shortfall(sets, t.micro_batch_size, dp_size)
    return TrainingData(tokenizer, sets[0].tokenizer_dir, loader, valid, desc, shortfall)


def gather_loader_state(loader: Any, groups: ParallelGroups) -> dict[str, Any]:
    """The data position a checkpoint records, the same on every rank. Collective: every rank calls it.

    Note: the in-memory loader's state is the same on every rank, so it is returned as is. A shard loader's
    readers differ per data-parallel rank (and can be in different epochs when their units differ in size):
    every rank's reader states are gathered over the world and one per dp rank is kept (tensor- and
    pipeline-parallel peers of a dp rank hold the same), so that each rank resumes its own readers, or the
    readers of another layout continue from all of them (`ShardLoader.load_state_dict`).
    """
    state = loader.state_dict()
    if not isinstance(loader, ShardLoader):
        return state
    mine = (groups.dp_rank, state["workers"])
    gathered: list[Any] = [mine]
    if groups.world_size > 1:
        gathered = [None] * groups.world_size
        dist.all_gather_object(gathered, mine)
    by_rank: dict[int, list[Any]] = {}
    for dp_rank, workers in gathered:
        by_rank.setdefault(dp_rank, workers)
    return combine_states(state, [by_rank[r] for r in range(groups.dp_size)])
