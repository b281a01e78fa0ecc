"""The whole model: a Megatron trunk feeding the CP multi-token head.

    tokens (B, T) -> trunk -> h (B, T, d) -> CP head -> loss / next-token distribution / drafts

n = 1, r = 1 with the residual map (W2 = 0 at init) is exactly a plain next-token LM of the trunk.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cpmtp_dist.config import ModelConfig
from cpmtp_dist.model.cp_head import IGNORE_INDEX, CPHead
from cpmtp_dist.model.cp_loss import CPLossOutput, cp_loss, load_balancing_loss
from cpmtp_dist.model.drafting import Draft, draft, next_token_log_probs
from cpmtp_dist.model.trunk import build_trunk, trunk_hidden, unembedding_weight
from cpmtp_dist.parallel.experts import LOCAL_EXPERTS, ExpertShard
from cpmtp_dist.parallel.vocab import LOCAL, VocabShard


class CPModel(nn.Module):
    """Trunk + CP head. Attribute names (`trunk`, `head`) are the checkpoint's key prefixes."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        vocab: VocabShard = LOCAL,
        experts: ExpertShard = LOCAL_EXPERTS,
        params_dtype: torch.dtype = torch.float32,
    ) -> None:
        """`vocab` is this rank's slice of the vocabulary under tensor parallelism, `experts` its CP
        components under expert parallelism (all of both by default)."""
        super().__init__()
        self.cfg = cfg
        self.vocab, self.experts = vocab, experts
        v_local = cfg.trunk.vocab_size // vocab.world
        r_local = cfg.cp.rank // experts.world
        self.trunk = build_trunk(cfg.trunk, params_dtype=params_dtype)
        self.head = CPHead(
            cfg.trunk.hidden_size,
            cfg.trunk.vocab_size,
            cfg.cp,
            component_range=(experts.start, experts.start + r_local),
            vocab_range=(vocab.start, vocab.start + v_local),
            params_dtype=params_dtype,
        )

    def hidden(self, tokens: Tensor) -> Tensor:
        """Final hidden states (B, T, d) of `tokens` (B, T)."""
        return trunk_hidden(self.trunk, tokens)

    def unembedding(self) -> Tensor:
        """The trunk's tied (V, d) unembedding, shared by the `shared` parameterisation."""
        return unembedding_weight(self.trunk)

    def forward(self, tokens: Tensor, targets: Tensor, with_accuracy: bool = False) -> CPLossOutput:
        """CP loss of `tokens` (B, T) against `targets` (B, T, n) (IGNORE_INDEX where missing).

        With `model.cp.aux_loss_weight > 0` the output also carries the load-balancing loss.
        """
        h = self.hidden(tokens)  # (B, T, d)
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
        return out

    def _single_device(self) -> None:
        if self.vocab.world > 1 or self.experts.world > 1:
            raise NotImplementedError("decoding runs in one process: load the checkpoint with tp = ep = 1")

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
