"""The trunk's core attention: which implementation computes softmax(q kᵀ / √d) v (`model.trunk.attention`).

- `local`: Megatron's `DotProductAttention`: the full [b·h, s, s] score matrix in memory, the mask applied
  to it, plain PyTorch everywhere.
- `sdpa`: `SDPAttention` below, Megatron's core-attention interface on
  `torch.nn.functional.scaled_dot_product_attention`: flash / memory-efficient / cuDNN kernels on GPUs, the
  math kernel on CPUs; causal masking by the kernel itself where it can (no mask tensor is built).
- `te`: Transformer Engine's fused attention (Megatron's `TEDotProductAttention`) as the core attention of the
  same layer spec: needs `transformer_engine` and a CUDA GPU, refused otherwise with the reason. Only the
  core attention changes (the projections and norms stay Megatron's local modules), so the parameters, and
  hence checkpoints, are the same for every choice.
- `auto`: te where it can run, else sdpa (which runs everywhere torch does); `local` only when asked for.

Decoding with the KV cache builds `te` and `auto` as sdpa (`decoding_attention`): the cache's prefix masks are
what `sdpa` and `local` are tested with.

Both `local` and `sdpa` take the layout's heads (Megatron hands each tensor-parallel rank its own heads), the
KV cache's keys and the explicit causal mask `cached_forward` builds after a prefix, and give the same
results (`tests/test_trunk.py`: ≤ 1e-5 in fp32, forward and gradients).
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch import Tensor


@functools.cache
def te_unavailable() -> str | None:
    """Why Transformer Engine's attention cannot run in this process, or None when it can (probed once: every
    trunk built with `auto` asks)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken build failing to load its CUDA library
        return f"transformer_engine does not import ({type(exc).__name__}: {exc})"
    return None


def resolve_attention(choice: str) -> str:
    """`model.trunk.attention` as built: auto is te where Transformer Engine and CUDA are present, else sdpa;
    te where it cannot run is refused with the reason."""
    if choice == "auto":
        return "sdpa" if te_unavailable() else "te"
    if choice == "te" and (why := te_unavailable()):
        raise ValueError(
            f"model.trunk.attention='te' needs Transformer Engine on a CUDA GPU, but {why}: install "
            "transformer-engine[pytorch] on a GPU machine, or set model.trunk.attention to 'sdpa' or 'auto'"
        )
    return choice


def decoding_attention(choice: str) -> str:
    """The attention a KV-cache decoder builds for a model trained with `choice` (same parameters)."""
    return "local" if choice == "local" else "sdpa"


def core_attention_module(choice: str) -> type | None:
    """The core-attention class of a resolved choice, None for Megatron's local one."""
    if choice == "sdpa":
        return SDPAttention
    if choice == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    return None


class SDPAttention(MegatronModule):
    """Megatron's core-attention interface (that of `DotProductAttention`) on `F.scaled_dot_product_attention`.

    Inputs are sequence-first: query [sq, b, h, d], key and value [sk, b, g, d] (g query groups, g | h); the
    output is [sq, b, h·d]. `attention_mask` (True = masked, Megatron's convention) wins when given; else a
    causal layer masks keys after each query, bottom-right aligned when sk > sq (queries are the last sq of
    the sk positions, as after a KV-cache prefix).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: object | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("model.trunk.attention='sdpa' does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: object | None = None,
    ) -> Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("model.trunk.attention='sdpa' takes no attention bias or packed sequences")
        sq, b, h, d = query.shape
        sk, groups = key.shape[0], h // key.shape[2]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        mask, causal = None, False
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if attention_mask is not None:
            mask = ~attention_mask  # sdpa: True = attend
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq == sk:
                causal = True
            else:
                rows = torch.arange(sk - sq, sk, device=q.device)[:, None]
                mask = torch.arange(sk, device=q.device)[None, :] <= rows
        dropout = self.dropout_p if self.training else 0.0
        with _dropout_rng(self.config, dropout):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, h * d)


def _dropout_rng(config: TransformerConfig, dropout: float) -> contextlib.AbstractContextManager:
    """Attention dropout draws from Megatron's model-parallel generator, as `DotProductAttention` does."""
    if dropout > 0 and not config.sequence_parallel:
        return tensor_parallel.get_cuda_rng_tracker().fork()
    return contextlib.nullcontext()
