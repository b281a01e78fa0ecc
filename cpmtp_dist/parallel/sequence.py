"""Megatron sequence parallelism (`parallel.sequence_parallel`, with tp > 1).

Outside the tensor-parallel matmuls, each tp rank holds T / tp positions of the activations instead of a
copy of all T: Megatron's column-parallel linears all-gather the sequence before the matmul and its
row-parallel linears reduce-scatter after it, so norms, dropout and residuals run on a shard.

Two pieces are ours:
- `SequenceParallelNorm`: the norm of a sequence shard. Its weight is shared by all tp ranks but each
  rank sees other positions, so the weight's gradient is the sum over tp. Megatron's torch norms refuse
  sequence parallelism (its own reduction of such gradients lives in its DDP wrapper, which DeepSpeed
  replaces here); this one puts the sum into autograd: the weight enters the norm through
  `copy_to_tensor_model_parallel_region` (identity forward, all-reduce over tp backward).
- `gather_sequence`: the CP head needs every position on every tp rank (its unembedding is split over the
  vocabulary). The head's gradient with respect to its input is already summed over tp (see
  `parallel/vocab.py`), so the backward of the gather only keeps this rank's positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer import TransformerConfig
from torch import Tensor, nn


class SequenceParallelNorm(nn.Module):
    """LayerNorm or RMSNorm (as `config.normalization`) over a sequence shard; the same parameter names
    and values as the torch norms of Megatron's local layer spec."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_: object) -> None:
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"normalization {config.normalization!r}: expected 'LayerNorm' or 'RMSNorm'")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.shape = (hidden_size,)
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))

    def forward(self, x: Tensor) -> Tensor:
        weight = copy_to_tensor_model_parallel_region(self.weight)
        if self.rms:
            return F.rms_norm(x, self.shape, weight, self.eps)
        return F.layer_norm(x, self.shape, weight, copy_to_tensor_model_parallel_region(self.bias), self.eps)


def gather_sequence(hidden: Tensor) -> Tensor:
    """[T / tp, B, d] on each tp rank -> [T, B, d]; the backward keeps this rank's slice of the gradient
    (which the CP head has already summed over tp)."""
    return gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
