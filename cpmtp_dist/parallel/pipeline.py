"""Pipeline parallelism: which part of the model a stage holds, and Megatron's 1F1B schedule over it.

The trunk's layers are split evenly over `pp` stages; the first stage also holds the embedding, the last
the final norm, a copy of the tied unembedding and the CP head. `run_schedule` drives Megatron-core's
schedule (`get_forward_backward_func`: 1F1B when pp > 1) over a step's micro-batches: activations go
forward stage to stage, gradients back, and the loss is computed on the last stage only.

Note: the tied embedding. The first stage's word embedding and the last stage's `output_layer.weight`
are one parameter of the model held twice. Both copies start equal (same initialisation), and after each
backward `finalize_tied_embedding_grads` sums their gradients over Megatron's embedding group, so both
take the same optimizer step. The last stage's copy is marked `ds_pipe_replicated` so that DeepSpeed's
gradient norm counts the parameter once. With `model.trunk.untie_embeddings` the output layer is the last
stage's own parameter and none of this happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor, nn

from cpmtp_dist.parallel.collectives import all_reduce_


@dataclass(frozen=True)
class PipelineStage:
    """Position of this rank's model part in the pipeline."""

    rank: int = 0
    size: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1


SINGLE_STAGE = PipelineStage()


def finalize_tied_embedding_grads(models: list[nn.Module], *args: Any, **kwargs: Any) -> None:
    """Megatron's `config.finalize_model_grads_func` hook, run by the schedule after the last backward.

    Only the tied-embedding all-reduce between the first and last stage happens here; the data-parallel
    reduction belongs to DeepSpeed, and the loss arrives normalised (the token count is ignored).
    """
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return
    if not models[0].share_embeddings_and_output_weights:
        return  # untied: the output layer is the last stage's own parameter
    if not parallel_state.is_rank_in_embedding_group():
        return
    weight = models[0].shared_embedding_or_output_weight()
    if weight.grad is None:
        # E.g. the `separate` parameterisation leaves the last stage's copy unused: its part is zero, and
        # the collective must still run on both stages.
        weight.grad = torch.zeros_like(weight)
    all_reduce_(weight.grad, parallel_state.get_embedding_group())


def prepare_trunk_for_schedule(trunk: nn.Module, stage: PipelineStage, dtype: torch.dtype) -> None:
    """Set what Megatron's schedule reads from the trunk's `TransformerConfig`, and mark the last stage's
    copy of the tied unembedding for DeepSpeed's gradient norm."""
    config = trunk.config
    config.pipeline_dtype = dtype  # the dtype of the activations sent between stages
    config.variable_seq_lengths = False  # every micro-batch is (micro_batch_size, seq_length)
    # The loss function returns sum / global count already: the schedule must not divide it again.
    config.calculate_per_token_loss = True
    config.deallocate_pipeline_outputs = True  # free a stage's sent activations, keep only their grad_fn
    config.finalize_model_grads_func = finalize_tied_embedding_grads
    config.grad_scale_func = None  # no fp16 loss scaling (fp32 or bf16)
    config.no_sync_func = None  # DeepSpeed owns the data-parallel reduction
    if stage.size > 1 and stage.is_last and not stage.is_first and trunk.share_embeddings_and_output_weights:
        trunk.shared_embedding_or_output_weight().ds_pipe_replicated = True


def run_schedule(
    trunk: nn.Module,
    micro_batches: list[Any],
    *,
    stage_forward: Callable[[Any], Tensor],
    loss_func: Callable[[Any, Tensor], tuple[Tensor, Tensor, Any]],
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
    engine: Any | None = None,
) -> list[Any]:
    """Forward (and unless `forward_only`, backward) of `micro_batches` through the pipeline.

    `stage_forward(mb)` is this stage's output for a micro-batch, sequence-first [T, B, d] (a later stage
    reads its input from what the schedule passed to `trunk.set_input_tensor`). On the last stage
    `loss_func(mb, output)` returns (loss to back-propagate, token count, statistics); the statistics of
    every micro-batch are returned there, and [] elsewhere. With a ZeRO-1/2 `engine`, DeepSpeed reduces
    the gradients once after the whole schedule instead of after every backward.
    """

    def forward_step(data_iterator: Iterator[Any], model_chunk: nn.Module) -> tuple[Tensor, Any]:
        mb = next(data_iterator)
        return stage_forward(mb), lambda output: loss_func(mb, output)

    coalesce = (
        engine.coalesce_grad_reduction()
        if engine is not None and not forward_only and engine.zero_optimization_stage() in (1, 2)
        else contextlib.nullcontext()
    )
    with coalesce:
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[trunk],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=forward_only,
        )
