"""Token streams, packed fixed-length samples, data-parallel batching and multi-token targets.

The in-memory path: documents are tokenised once into a single stream (EOS after every document), the stream
is cut into non-overlapping samples of ``seq_length + 1`` tokens, and samples are visited in a seeded
per-epoch permutation. A global batch is the next ``global_batch_size`` samples of that (endless) order;
data-parallel rank k takes the k-th contiguous block of it. Hence the union over ranks of one step, in rank
order, is exactly the dp=1 step, and the loader state (epoch, position) is the same on every rank and
independent of the parallel layout.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cpmtp_dist.config import TrainConfig, TrunkConfig
from cpmtp_dist.data.tokenizer import Tokenizer

_CACHE_FORMAT = "cpmtp_dist.token_stream/v1"
"""Part of the cache key; bump it when the stream layout changes so that old caches are not reused."""


class _HasText(Protocol):
    """A document as the stream needs it (e.g. :class:`cpmtp_dist.data.corpus.Document`)."""

    @property
    def name(self) -> str: ...

    @property
    def text(self) -> str: ...


def stream_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves memory and cache size), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def corpus_fingerprint(docs: Sequence[_HasText]) -> str:
    """sha256 over the names and exact texts of ``docs`` in order (length-prefixed, so it is unambiguous)."""
    h = hashlib.sha256()
    for doc in docs:
        for field in (doc.name, doc.text):
            data = field.encode("utf-8", errors="surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


def token_cache_file(docs: Sequence[_HasText], tokenizer: Tokenizer, cache_dir: Path) -> Path:
    """Where :func:`build_token_stream` caches the stream of ``docs`` under ``tokenizer``."""
    key = hashlib.sha256(
        f"{_CACHE_FORMAT}\0{tokenizer.fingerprint}\0{corpus_fingerprint(docs)}".encode()
    ).hexdigest()
    return Path(cache_dir) / f"tokens-{key[:24]}.npy"


def build_token_stream(
    docs: Sequence[_HasText], tokenizer: Tokenizer, cache_path: Path | None = None
) -> np.ndarray:
    """Tokenise every document, append EOS after each, and concatenate into one 1-D array.

    Args:
        docs: documents (anything with ``name`` and ``text``), in the order they are concatenated.
        tokenizer: the tokenizer; its ``fingerprint`` keys the cache.
        cache_path: optional cache folder. The stream is stored as ``tokens-<key>.npy`` where the key hashes
            the tokenizer fingerprint and the corpus fingerprint (names + texts), so a changed tokenizer or
            corpus never reads a stale cache, and an unchanged one skips tokenisation entirely.

    Tokenisation is a plain loop: on the stdlib corpus it runs at a few million characters per second, and
    SentencePiece's own multi-threaded batch encode was not faster on 2 cores.
    """
    dtype = stream_dtype(tokenizer.vocab_size)
    cache_file = None
    if cache_path is not None:
        cache_file = token_cache_file(docs, tokenizer, Path(cache_path))
        if cache_file.is_file():
            return np.load(cache_file)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    for doc in docs:
        pieces.append(np.asarray(tokenizer.encode(doc.text), dtype=dtype))
        pieces.append(eos)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: ranks that build the same cache concurrently never read a partial file.
        tmp = cache_file.with_name(f".{cache_file.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, stream)
        os.replace(tmp, cache_file)
    return stream


def _samples_view(stream: np.ndarray, sample_length: int) -> np.ndarray:
    """The stream as (num_samples, sample_length) without copying; the ragged tail is dropped."""
    num_samples = len(stream) // sample_length
    return np.asarray(stream)[: num_samples * sample_length].reshape(num_samples, sample_length)


class PackedSequenceLoader:
    """Endless, deterministic, data-parallel micro-batches of packed ``seq_length + 1`` token samples.

    Each micro-batch is a ``torch.long`` tensor of shape (micro_batch_size, seq_length + 1); pass it to
    :func:`make_targets`. Sample order: epoch e visits all samples in the permutation drawn from
    ``numpy.random.default_rng([seed, e])``; epochs follow each other without a gap, so a global batch may
    straddle an epoch boundary and no sample is ever dropped.
    """

    def __init__(
        self,
        stream: np.ndarray,
        seq_length: int,
        micro_batch_size: int,
        global_batch_size: int,
        *,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> None:
        if seq_length < 1 or micro_batch_size < 1 or global_batch_size < 1:
            raise ValueError("seq_length, micro_batch_size and global_batch_size must be >= 1")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size {global_batch_size} is not a multiple of "
                f"micro_batch_size * dp_size = {micro_batch_size} * {dp_size}"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy SeedSequence), got {seed}")
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self._samples = _samples_view(stream, seq_length + 1)
        if self.num_samples < global_batch_size:
            raise ValueError(
                f"the stream holds {self.num_samples} samples of {seq_length + 1} tokens "
                f"({len(stream)} tokens), fewer than one global batch of {global_batch_size}"
            )
        self._seed = seed
        self._epoch = 0
        self._position = 0
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    @classmethod
    def from_config(
        cls,
        stream: np.ndarray,
        trunk: TrunkConfig,
        train: TrainConfig,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
    ) -> PackedSequenceLoader:
        """Build from the config sections (``trunk.seq_length``, ``train`` batch sizes and seed)."""
        return cls(
            stream,
            trunk.seq_length,
            train.micro_batch_size,
            train.global_batch_size,
            seed=train.seed,
            dp_rank=dp_rank,
            dp_size=dp_size,
        )

    @property
    def num_samples(self) -> int:
        """Samples per epoch."""
        return int(self._samples.shape[0])

    @property
    def micro_batches_per_step(self) -> int:
        """Gradient-accumulation steps per optimizer step on this rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def consumed_samples(self) -> int:
        """Samples taken so far over all ranks and epochs."""
        return self._epoch * self.num_samples + self._position

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self._epoch:
            self._perm = np.random.default_rng([self._seed, self._epoch]).permutation(self.num_samples)
            self._perm_epoch = self._epoch
        return self._perm

    def _take(self, count: int) -> np.ndarray:
        """The next ``count`` sample indices of the endless order, advancing the state."""
        parts = []
        while count:
            n = min(count, self.num_samples - self._position)
            parts.append(self._permutation()[self._position : self._position + n])
            self._position += n
            count -= n
            if self._position == self.num_samples:
                self._epoch += 1
                self._position = 0
        return np.concatenate(parts)

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches for one optimizer step (every rank advances by the full global batch)."""
        indices = self._take(self.global_batch_size)
        per_rank = self.global_batch_size // self.dp_size
        mine = indices[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        batch = torch.from_numpy(self._samples[mine].astype(np.int64))
        return list(batch.split(self.micro_batch_size))

    def state_dict(self) -> dict[str, Any]:
        """Position in the sample order; identical on every dp rank and independent of dp_size."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self._seed,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume so that the following steps equal those of an uninterrupted run."""
        num_samples = state.get("num_samples", self.num_samples)
        if num_samples != self.num_samples:
            raise ValueError(
                f"loader state was saved with {num_samples} samples per epoch, this stream has "
                f"{self.num_samples}: the data or seq_length changed, resuming would not continue exactly"
            )
        epoch, position, seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        if epoch < 0 or not 0 <= position < self.num_samples or seed < 0:
            raise ValueError(f"invalid loader state {state}")
        self._epoch, self._position, self._seed = epoch, position, seed


def eval_batches(
    valid_stream: np.ndarray,
    seq_length: int,
    micro_batch_size: int,
    num_batches: int,
    *,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> list[torch.Tensor]:
    """A fixed list of validation micro-batches: the first samples of ``valid_stream``, in stream order.

    Takes ``num_batches`` full micro-batches (fewer if the stream is short; at least one is required). With
    ``dp_size > 1`` rank k gets every dp_size-th batch starting at k; ``num_batches`` must then be a multiple
    of dp_size so that every rank evaluates the same number of batches and their means can be averaged.
    """
    if num_batches < 1 or micro_batch_size < 1 or seq_length < 1:
        raise ValueError("num_batches, micro_batch_size and seq_length must be >= 1")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
    samples = _samples_view(valid_stream, seq_length + 1)
    available = samples.shape[0] // micro_batch_size
    if available < 1:
        raise ValueError(
            f"validation stream of {len(valid_stream)} tokens holds no full micro-batch of "
            f"{micro_batch_size} x {seq_length + 1} tokens"
        )
    count = min(num_batches, available)
    count -= count % dp_size
    if count < dp_size:
        raise ValueError(f"validation stream holds {available} micro-batches, fewer than dp_size={dp_size}")
    batches = torch.from_numpy(samples[: count * micro_batch_size].astype(np.int64)).split(micro_batch_size)
    return list(batches[dp_rank::dp_size])


def make_targets(
    batch: torch.Tensor, horizon: int, ignore_index: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the next-``horizon`` targets of a (B, T + 1) sample batch.

    Returns ``tokens = batch[:, :-1]`` of shape (B, T) and ``targets`` of shape (B, T, horizon) with
    ``targets[b, t, s - 1] = batch[b, t + s]`` for ``t + s <= T`` and ``ignore_index`` otherwise (future tokens
    past the end of the sample are missing, and the loss marginalises them out).
    """
    if batch.dim() != 2 or batch.shape[1] < 2:
        raise ValueError(f"batch must have shape (B, T + 1) with T >= 1, got {tuple(batch.shape)}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    pad = batch.new_full((batch.shape[0], horizon - 1), ignore_index)
    # Window t of the shifted, padded row holds batch[t + 1 .. t + horizon] (padding past the end).
    future = torch.cat([batch[:, 1:], pad], dim=1)
    targets = future.unfold(1, horizon, 1).contiguous()
    return batch[:, :-1].contiguous(), targets
