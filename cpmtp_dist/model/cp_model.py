"""The whole model: a Megatron trunk feeding the CP multi-token head.

    tokens (B, T) -> trunk -> h (B, T, d) -> CP head -> loss / next-token distribution / drafts

n = 1, r = 1 with the residual map (W2 = 0 at init) is exactly a plain next-token LM of the trunk.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor, nn

from cpmtp_dist.config import ModelConfig
from cpmtp_dist.model.cp_head import IGNORE_INDEX, CPHead
from cpmtp_dist.model.cp_loss import CPLossOutput, cp_loss, distillation_kl_sum, load_balancing_loss
from cpmtp_dist.model.drafting import Draft, draft, next_token_log_probs
from cpmtp_dist.model.trunk import (
    build_trunk,
    global_param_name,
    init_trunk_weights,
    stage_forward,
    trunk_hidden,
    unembedding_weight,
)
from cpmtp_dist.parallel.experts import LOCAL_EXPERTS, ExpertShard
from cpmtp_dist.parallel.pipeline import SINGLE_STAGE, PipelineStage
from cpmtp_dist.parallel.sequence import gather_sequence
from cpmtp_dist.parallel.vocab import LOCAL, VocabShard


class DistillationTeacher(Protocol):
    """The base model distilled into the head (`training/finetune.py`): frozen, not part of the model."""

    def log_probs(self, h: Tensor) -> Tensor:
        """Next-token log-probabilities (N, V), fp32, of the final hidden states h (N, d); no grad."""
        ...


class CPModel(nn.Module):
    """Trunk + CP head. Attribute names (`trunk`, `head`) are the checkpoint's key prefixes.

    Under pipeline parallelism a `CPModel` is one stage: its part of the trunk, and the head on the last
    stage only (`head` is None elsewhere).

    A distillation teacher (`set_teacher`) is a plain attribute, not a submodule: its weights are not the
    model's parameters, state-dict entries or checkpoint keys.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        vocab: VocabShard = LOCAL,
        experts: ExpertShard = LOCAL_EXPERTS,
        stage: PipelineStage = SINGLE_STAGE,
        params_dtype: torch.dtype = torch.float32,
        sequence_parallel: bool = False,
        seed: int | None = None,
    ) -> None:
        """`vocab` is this rank's slice of the vocabulary under tensor parallelism, `experts` its CP
        components under expert parallelism (all of both by default), `stage` its pipeline stage;
        `sequence_parallel` shards the trunk's activations over the sequence (tp > 1).

        With `seed`, the weights are a function of the seed alone, whatever the layout: the trunk's are
        drawn per parameter name (`init_trunk_weights`), the head's from a generator seeded apart from
        the trunk's construction. Without it, they come from the default generator's current state.
        """
        super().__init__()
        self.cfg = cfg
        self.vocab, self.experts, self.stage = vocab, experts, stage
        self.teacher: DistillationTeacher | None = None
        self.sequence_parallel = sequence_parallel
        v_local = cfg.trunk.vocab_size // vocab.world
        r_local = cfg.cp.rank // experts.world
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            self.trunk = build_trunk(
                cfg.trunk,
                pre_process=stage.is_first,
                post_process=stage.is_last,
                params_dtype=params_dtype,
                sequence_parallel=sequence_parallel,
            )
            if seed is not None:
                init_trunk_weights(self.trunk, cfg.trunk, seed, stage)
        self.head: CPHead | None = None
        if stage.is_last:
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                self.head = CPHead(
                    cfg.trunk.hidden_size,
                    cfg.trunk.vocab_size,
                    cfg.cp,
                    component_range=(experts.start, experts.start + r_local),
                    vocab_range=(vocab.start, vocab.start + v_local),
                    params_dtype=params_dtype,
                )

    def set_teacher(self, teacher: DistillationTeacher | None) -> None:
        """Attach (or, with None, detach) the teacher of the distillation loss: while the model is in
        training mode, `head_loss` then also returns `distill_kl_sum`."""
        if isinstance(teacher, nn.Module):
            raise TypeError("the teacher must not be an nn.Module: its weights would join the model's")
        if teacher is not None and (
            self.vocab.world > 1 or self.experts.world > 1 or self.stage.size > 1 or self.sequence_parallel
        ):
            raise NotImplementedError("distillation runs at tp = pp = ep = 1 without sequence parallelism")
        self.teacher = teacher

    def hidden(self, tokens: Tensor) -> Tensor:
        """Final hidden states (B, T, d) of `tokens` (B, T)."""
        return trunk_hidden(self.trunk, tokens)

    def unembedding(self) -> Tensor:
        """The trunk's (V, d) unembedding (tied, or the untied output layer's), used by the `shared`
        parameterisation."""
        return unembedding_weight(self.trunk)

    def global_name(self, name: str) -> str:
        """The single-stage model's name of this stage's state-dict key `name` (the last stage's copy
        of the tied unembedding is the word embedding)."""
        if self.stage.size == 1 or not name.startswith("trunk."):
            return name
        trunk = self.cfg.trunk
        return "trunk." + global_param_name(
            name.removeprefix("trunk."), self.stage, trunk.num_layers, tied=not trunk.untie_embeddings
        )

    def stage_output(self, tokens: Tensor) -> Tensor:
        """This pipeline stage's output [T, B, d] (sequence-first, as megatron passes it between stages;
        [T / tp, B, d] under sequence parallelism)."""
        return stage_forward(self.trunk, tokens)

    def forward(self, tokens: Tensor, targets: Tensor, with_accuracy: bool = False) -> CPLossOutput:
        """CP loss of `tokens` (B, T) against `targets` (B, T, n) (IGNORE_INDEX where missing).

        With `model.cp.aux_loss_weight > 0` the output also carries the load-balancing loss.
        """
        return self.loss_from_output(self.stage_output(tokens), targets, with_accuracy=with_accuracy)

    def loss_from_output(self, output: Tensor, targets: Tensor, with_accuracy: bool = False) -> CPLossOutput:
        """CP loss of the last stage's output [T, B, d] (sequence-sharded under sequence parallelism)."""
        if self.sequence_parallel:
            output = gather_sequence(output)
        return self.head_loss(output.transpose(0, 1), targets, with_accuracy=with_accuracy)

    def head_loss(self, h: Tensor, targets: Tensor, with_accuracy: bool = False) -> CPLossOutput:
        """CP loss of the final hidden states `h` (B, T, d) against `targets` (B, T, n): the last stage.

        With a teacher attached and the model in training mode, `distill_kl_sum` holds the summed
        KL(base || draft) (`cp_loss.distillation_kl_sum`); evaluation (eval mode) reports the CP loss only.
        """
        if self.head is None:
            raise ValueError("only the last pipeline stage holds the CP head")
        cp = self.cfg.cp
        out = cp_loss(
            self.head,
            h,
            targets,
            self.unembedding(),
            impl=cp.loss_impl,
            chunk_tokens=cp.chunk_tokens,
            with_accuracy=with_accuracy,
            vocab=self.vocab,
            experts=self.experts,
        )
        if cp.aux_loss_weight > 0:
            # The gate once more with grad (the loss output's log-weights are detached): (N, r), cheap.
            log_w = self.head.gate_log_weights(h.reshape(-1, h.shape[-1]))
            has_target = (targets != IGNORE_INDEX).any(-1).reshape(-1)
            out.aux_loss = load_balancing_loss(log_w, out.responsibilities, has_target)
        if self.teacher is not None and self.training:
            out.distill_kl_sum = distillation_kl_sum(
                self.head,
                h,
                targets,
                self.unembedding(),
                self.teacher.log_probs,
                chunk_tokens=cp.chunk_tokens,
            )
        return out

    def _single_device(self) -> None:
        if self.vocab.world > 1 or self.experts.world > 1 or self.stage.size > 1 or self.sequence_parallel:
            raise NotImplementedError(
                "decoding runs in one process: load the checkpoint with tp = pp = ep = 1"
            )

    @torch.no_grad()
    def next_token_log_probs(self, tokens: Tensor) -> Tensor:
        """log P(x_{T+1} | tokens) from the last position: (B, T) -> (B, V), fp32."""
        self._single_device()
        h = self.hidden(tokens)[:, -1]  # (B, d)
        return next_token_log_probs(self.head, h, self.unembedding())

    @torch.no_grad()
    def draft(self, tokens: Tensor, *, greedy: bool, generator: torch.Generator | None = None) -> Draft:
        """Draft the next n tokens after `tokens` (B, T) from the head at the last position."""
        self._single_device()
        h = self.hidden(tokens)[:, -1]
        return draft(self.head, h, self.unembedding(), greedy=greedy, generator=generator)
