"""The causal transformer trunk: a Megatron-core ``GPTModel`` (local layer spec with the core attention of
``model.trunk.attention``, RoPE, tied embeddings).

The CP multi-token head consumes the trunk's final hidden states (after the final norm) and the tied
unembedding; ``trunk_hidden`` and ``unembedding_weight`` expose exactly those. Megatron works sequence-first
internally ([T, B, d]); everything returned here is batch-first.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
import torch.nn.functional as F
from megatron.core.inference.contexts import BaseInferenceContext
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from torch import Tensor

from cpmtp_dist.config import TrunkConfig
from cpmtp_dist.model.attention import core_attention_module, resolve_attention
from cpmtp_dist.parallel.pipeline import PipelineStage
from cpmtp_dist.parallel.sequence import SequenceParallelNorm
from cpmtp_dist.parallel.sharded_state import tp_view
from cpmtp_dist.parallel.state import get_parallel_groups


def make_transformer_config(
    cfg: TrunkConfig,
    *,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = True,
    sequence_parallel: bool = False,
) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for the trunk, sized for the current parallel layout."""
    groups = get_parallel_groups()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.norm_epsilon,
        # GPT-style MLP (GELU) or Llama-style gated SiLU (SwiGLU), with bias-free linears as most current LMs.
        activation_func=F.silu if cfg.mlp == "swiglu" else F.gelu,
        gated_linear_unit=cfg.mlp == "swiglu",
        add_bias_linear=False,
        hidden_dropout=cfg.dropout,
        attention_dropout=cfg.dropout,
        init_method_std=cfg.init_method_std,
        # Megatron reads these sizes from the config (e.g. layers per pipeline stage), not from the groups.
        tensor_model_parallel_size=groups.tp_size,
        pipeline_model_parallel_size=groups.pp_size,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        attention_softmax_in_fp32=True,
        # CPU init draws the full weight from the default generator and slices it, so the weights do not
        # depend on the TP degree; GPU init draws each shard from the tracked model-parallel RNG.
        use_cpu_initialization=use_cpu_initialization,
        # The fusions need CUDA extensions or torch.compile; the plain PyTorch paths run everywhere.
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        # "full" (megatron's default) and [] mean the same, but "full" warns on every build; no CUDA graphs here.
        cuda_graph_scope=[],
    )


def build_trunk(
    cfg: TrunkConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = True,
    sequence_parallel: bool = False,
) -> GPTModel:
    """Build the trunk on the current parallel layout (``initialize_parallel`` must have run).

    ``pre_process`` / ``post_process`` select the embedding / final-norm-and-output ends (pipeline stages).
    ``sequence_parallel`` (tp > 1) shards the activations outside the matmuls over the sequence; the norms
    are then ``SequenceParallelNorm``. The weights come from the default torch generator: seed it
    (``initialize_parallel(seed=...)`` does) or call ``init_trunk_weights`` to get reproducible weights.
    """
    config = make_transformer_config(
        cfg,
        params_dtype=params_dtype,
        use_cpu_initialization=use_cpu_initialization,
        sequence_parallel=sequence_parallel,
    )
    spec = get_gpt_layer_local_spec(normalization=cfg.normalization)
    core_attention = core_attention_module(resolve_attention(cfg.attention))
    if core_attention is not None:
        spec.submodules.self_attention.submodules.core_attention = core_attention
    if sequence_parallel:
        spec.submodules.input_layernorm = SequenceParallelNorm
        spec.submodules.pre_mlp_layernorm = SequenceParallelNorm
        layers_per_stage = cfg.num_layers // get_parallel_groups().pp_size
        spec = TransformerBlockSubmodules(
            layer_specs=[spec] * layers_per_stage, layer_norm=SequenceParallelNorm
        )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        # Logits stay split over the vocabulary under TP; the loss is computed vocabulary-parallel.
        parallel_output=True,
        share_embeddings_and_output_weights=not cfg.untie_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=cfg.rotary_base,
        rope_scaling=cfg.rope_scaling_factor > 0,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0,
    )
    if params_dtype != torch.float32:
        # The local spec's torch norms ignore params_dtype; megatron's Float16Module would cast them too.
        model.to(dtype=params_dtype)
    if cfg.mlp == "swiglu":
        for layer in model.decoder.layers:
            layer.mlp.linear_fc1.weight.glu_halves = True  # see `sharded_state.tp_view`
    return model


def stage_forward(model: GPTModel, tokens: Tensor) -> Tensor:
    """This pipeline stage's output for ``tokens`` (B, T) int64, sequence-first [T, B, d].

    Runs megatron's own pieces in the order ``GPTModel.forward`` does, minus the output layer:
    ``_preprocess`` (on the first stage the embedding [T, B, d]; everywhere the RoPE table for T positions),
    then ``decoder`` (this stage's layers and, on the last stage, the final norm). A later stage's decoder
    reads the previous stage's output, which megatron's schedule hands it through ``model.set_input_tensor``.
    Attention is causal by the layer spec (``AttnMaskType.causal``): with ``attention_mask=None`` megatron
    builds the upper-triangular mask itself.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
    return _run(model, tokens)


def _run(
    model: GPTModel,
    tokens: Tensor,
    *,
    cache: BaseInferenceContext | None = None,
    attention_mask: Tensor | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """Megatron's ``_preprocess`` then ``decoder`` for `tokens` (B, k) at positions offset .. offset + k - 1
    (offset = the positions `cache` already holds, else 0), or at `positions` (k,) when given (a tree of
    tokens in cache slots offset .. offset + k - 1); sequence-first output [k, B, d]."""
    batch, k = tokens.shape
    offset = cache.sequence_len_offset if cache is not None else 0
    slots = torch.arange(offset, offset + k, device=tokens.device)
    position_ids = (slots if positions is None else positions).unsqueeze(0).expand(batch, k)
    preproc = model._preprocess(input_ids=tokens, position_ids=position_ids, inference_context=cache)
    decoder_input, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin, sequence_len_offset, padding_mask = (
        preproc[:6]
    )
    if positions is not None:
        # Megatron rotates the query in cache slot i, and the cached (unrotated) key in slot j, by row i / j
        # of the rotary table: a table whose rows are those of each slot's position puts the tree's tokens at
        # their depths.
        if rotary_pos_emb is None or rotary_pos_cos is not None:
            raise ValueError("tree positions need the trunk's plain RoPE table (no flash decoding)")
        rows = torch.cat([torch.arange(offset, device=tokens.device), positions])
        rotary_pos_emb = rotary_pos_emb[rows]
    return model.decoder(
        hidden_states=decoder_input,
        attention_mask=attention_mask,
        inference_context=cache,
        rotary_pos_emb=rotary_pos_emb,
        rotary_pos_cos=rotary_pos_cos,
        rotary_pos_sin=rotary_pos_sin,
        sequence_len_offset=sequence_len_offset,
        padding_mask=padding_mask,
    )


def trunk_hidden(model: GPTModel, tokens: Tensor) -> Tensor:
    """Final hidden states of a whole (single-stage) trunk, after the final norm: (B, T) -> (B, T, d)."""
    if not (model.pre_process and model.post_process):
        raise ValueError("trunk_hidden needs the whole trunk: use stage_forward on a pipeline stage")
    return stage_forward(model, tokens).transpose(0, 1).contiguous()


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
TIED_COPY = "output_layer.weight"
"""The last pipeline stage's copy of the tied unembedding (absent from a single-stage trunk with tied
embeddings)."""


def global_param_name(name: str, stage: PipelineStage, num_layers: int, tied: bool = True) -> str:
    """The name in the single-stage trunk of a stage's parameter: stage layer i is layer
    i + stage.rank * num_layers / stage.size, and the tied copy is the word embedding (an untied output
    layer is a parameter of its own)."""
    if name == TIED_COPY and tied:
        return "embedding.word_embeddings.weight"
    offset = stage.rank * (num_layers // stage.size)
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)


@torch.no_grad()
def init_trunk_weights(model: GPTModel, cfg: TrunkConfig, seed: int, stage: PipelineStage) -> None:
    """Draw every matrix of the trunk from a generator seeded by (seed, its single-stage name), whole,
    and keep this rank's tensor-parallel slice: the weights depend on the seed only, not on tp or pp.

    The distributions are megatron's: normal(0, init_method_std), with std / sqrt(2 L) for the output
    projections of attention and MLP (``scaled_init_method_normal``). Norm weights keep their
    construction values (ones, zeros).
    """
    groups = get_parallel_groups()
    std = cfg.init_method_std
    for name, param in model.named_parameters():
        if param.dim() < 2:
            continue
        full_name = global_param_name(name, stage, cfg.num_layers, tied=not cfg.untie_embeddings)
        local, dim = tp_view(param, param)
        shape = list(local.shape)
        split = groups.tp_size > 1 and dim is not None
        if split:
            shape[dim] *= groups.tp_size
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{full_name}".encode()))
        scale = std / math.sqrt(2.0 * cfg.num_layers) if full_name.endswith(_OUTPUT_PROJECTIONS) else std
        full = torch.randn(shape, generator=gen, dtype=torch.float32) * scale
        if split:
            full = full.chunk(groups.tp_size, dim=dim)[groups.tp_rank]
        local.copy_(full)


_OUTPUT_PROJECTIONS = ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight")


def unembedding_weight(model: GPTModel) -> Tensor:
    """The (V_local, d) unembedding, V_local = V / tp: the output layer's own weight when untied (last stage),
    else the tied one (the word embedding on the first stage, its copy on the last)."""
    if not model.share_embeddings_and_output_weights:
        if not model.post_process:
            raise ValueError("this pipeline stage does not hold the (untied) output layer")
        return model.output_layer.weight
    weight = model.shared_embedding_or_output_weight()
    if weight is None:
        raise ValueError("this pipeline stage holds neither the embedding nor the output layer")
    return weight


def cached_forward(
    model: GPTModel, tokens: Tensor, cache: BaseInferenceContext, parents: list[int] | None = None
) -> Tensor:
    """Final hidden states (B, k, d) of `tokens` (B, k) appended after the `cache.sequence_len_offset`
    positions already held in megatron's static KV cache `cache` (a ``StaticInferenceContext``).

    The new keys and values are written at positions offset .. offset + k - 1; the offset is *not*
    advanced here (the caller decides how many of the k positions to keep, see
    ``cpmtp_dist/inference/kv_cache.py``). RoPE rotates by absolute position. Megatron drops its causal
    mask once the offset is past 0 (one query per step needs none); k > 1 new tokens after a prefix get
    the explicit mask "query at offset + i sees keys 0 .. offset + i".

    `parents` (k,) makes the k tokens a tree after the prefix instead of a sequence: token i's parent is
    token parents[i] (< i; -1: a child of the prefix's last position). Token i then sits at position
    offset + (its number of ancestors among the k) and sees the prefix, its ancestors and itself only (a tree
    attention mask).
    """
    if not (model.pre_process and model.post_process):
        raise ValueError("cached_forward needs the whole trunk (pp = 1)")
    k = tokens.shape[1]
    offset = cache.sequence_len_offset
    if parents is not None and parents != list(range(-1, k - 1)):
        if offset == 0:
            raise ValueError("a tree of tokens needs a prefix in the cache")
        sees, depth = tree_visibility(parents)
        mask = torch.ones(k, offset + k, dtype=torch.bool)
        mask[:, :offset] = False
        mask[:, offset:] = ~sees
        positions = offset + torch.tensor(depth, device=tokens.device)
        mask = mask.to(tokens.device)[None, None]
        return _run(model, tokens, cache=cache, attention_mask=mask, positions=positions).transpose(0, 1)
    mask = None
    if offset > 0 and k > 1:
        query = torch.arange(offset, offset + k, device=tokens.device)[:, None]
        key = torch.arange(offset + k, device=tokens.device)[None, :]
        mask = (key > query)[None, None]  # True = masked, megatron's convention
    out = _run(model, tokens, cache=cache, attention_mask=mask)
    return out.transpose(0, 1)


def tree_visibility(parents: list[int]) -> tuple[Tensor, list[int]]:
    """For a tree given by `parents` (parents[i] < i, -1 for a child of the prefix): which tokens each
    token sees (itself and its ancestors), (k, k) bool, and each token's number of ancestors."""
    k = len(parents)
    sees = torch.eye(k, dtype=torch.bool)
    depth = [0] * k
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"token {i} of a tree has parent {parent}: parents must come first")
        if parent >= 0:
            sees[i] |= sees[parent]
            depth[i] = depth[parent] + 1
    return sees, depth
