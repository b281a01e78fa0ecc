"""The trunk's KV cache for decoding one sequence, with rollback.

Megatron's ``StaticInferenceContext`` holds, per layer, preallocated key/value buffers of `capacity`
positions and an offset: the number of positions in use. A forward writes its k new positions at the
offset; attention reads positions 0 .. offset + k - 1 only. Rolling back to a shorter prefix is
therefore just moving the offset back: the stale entries past it are never read and are overwritten by
the next forward.
"""

from __future__ import annotations

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

    def extend(self, tokens: Tensor) -> Tensor:
        """Append `tokens` (k,) and return their final hidden states (k, d)."""
        k = tokens.shape[0]
        if self.length + k > self.capacity:
            raise ValueError(
                f"KV cache of {self.capacity} positions holds {self.length}: {k} more do not fit"
            )
        h = cached_forward(self.trunk, tokens.unsqueeze(0), self.context)
        self.context.sequence_len_offset += k
        return h[0]

    def rollback(self, length: int) -> None:
        """Keep the first `length` positions only."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll a KV cache of {self.length} positions back to {length}")
        self.context.sequence_len_offset = length

    def reset(self) -> None:
        self.rollback(0)
