"""The trunk's KV cache for decoding one sequence, with rollback.

Megatron's ``StaticInferenceContext`` holds, per layer, preallocated key/value buffers of `capacity`
positions and an offset: the number of positions in use. A forward writes its k new positions at the
offset; attention reads positions 0 .. offset + k - 1 only. Rolling back to a shorter prefix is
therefore just moving the offset back: the stale entries past it are never read and are overwritten by
the next forward.

A tree of tokens (tree decoding) is written to the slots after the prefix in tree order; keeping one of its
paths moves that path's keys and values to the slots right after the prefix (`keep`). Megatron caches keys
before RoPE and rotates them by slot on every read, so a moved key is rotated by its new slot, which is its
position on the kept path.
"""

from __future__ import annotations

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.gpt import GPTModel
from torch import Tensor

from cpmtp_dist.model.trunk import cached_forward


class KVCache:
    def __init__(self, trunk: GPTModel, capacity: int) -> None:
        self.trunk = trunk
        self.capacity = capacity
        self.context = StaticInferenceContext(max_batch_size=1, max_sequence_length=capacity)

    @property
    def length(self) -> int:
        """Positions held (the accepted prefix)."""
        return self.context.sequence_len_offset

    def extend(self, tokens: Tensor, parents: list[int] | None = None) -> Tensor:
        """Append `tokens` (k,) and return their final hidden states (k, d); with `parents` the tokens
        are a tree after the prefix (`cached_forward`), and a `keep` must follow."""
        k = tokens.shape[0]
        if self.length + k > self.capacity:
            raise ValueError(
                f"KV cache of {self.capacity} positions holds {self.length}: {k} more do not fit"
            )
        h = cached_forward(self.trunk, tokens.unsqueeze(0), self.context, parents)
        self.context.sequence_len_offset += k
        return h[0]

    def rollback(self, length: int) -> None:
        """Keep the first `length` positions only."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll a KV cache of {self.length} positions back to {length}")
        self.context.sequence_len_offset = length

    def keep(self, base: int, slots: list[int]) -> None:
        """Keep the first `base` positions and then the positions in `slots` (increasing, >= base): a path
        of a tree written after `base`."""
        if slots == list(range(base, base + len(slots))):
            return self.rollback(base + len(slots))
        ordered = all(a < b for a, b in zip(slots, slots[1:], strict=False))
        if not (ordered and base <= slots[0] and slots[-1] < self.length):
            raise ValueError(f"cannot keep slots {slots} after {base} of a KV cache of {self.length}")
        index = torch.tensor(slots)
        for memories in self.context.key_value_memory_dict.values():
            for memory in memories:  # [capacity, batch, groups, head dim]: keys, then values
                memory[base : base + len(slots)] = memory[index.to(memory.device)]
        self.rollback(base + len(slots))

    def reset(self) -> None:
        self.rollback(0)
