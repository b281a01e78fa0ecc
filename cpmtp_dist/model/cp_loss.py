"""Exact CP multi-token losses (docs/MODEL.md, "Training loss" and "Exact loss without materialising r·n·V
logits").

Per position t with component log-joints

    l_{t,a} = log w_a(h_t) + sum_{s: target exists} log P_a^(s)(x_{t+s} | h_t)        # (N, r)
    L_t     = -logsumexp_a l_{t,a}

Missing targets (IGNORE_INDEX) are marginalised out by dropping their factor, which is exact
because every factor sums to 1. Positions with no target at all contribute nothing.

Two implementations with identical values and gradients:
  - `naive`: materialise all r*n*V log-probabilities and let autograd do the rest;
  - `chunked`: a custom autograd function. Forward runs chunk by chunk under no_grad keeping only
    the n*r target log-probabilities per position; backward recomputes each chunk and feeds the
    logits the closed-form gradient gamma_{t,a} * (softmax - onehot), where gamma = softmax_a(l) are
    the responsibilities. Peak logit memory is one chunk of (chunk_tokens, V).
All loss math is fp32, whatever the dtype of the trunk and the head's parameters.

Head-only fine-tuning adds `distillation_kl_sum`: KL(base || draft) of each future token, the draft's
conditional given the true prefix against a frozen base model's next-token distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from cpmtp_dist.model.cp_head import IGNORE_INDEX, CPHead, upcast
from cpmtp_dist.parallel.experts import LOCAL_EXPERTS, ExpertShard
from cpmtp_dist.parallel.vocab import LOCAL, VocabShard


@dataclass
class CPLossOutput:
    """Loss value and detached statistics of one batch of positions.

    `loss_sum` is the only differentiable field: the *sum* of L_t over positions that have at least
    one target. The caller divides by the global count of such positions (docs/MODEL.md).
    """

    loss_sum: Tensor  # () fp32, differentiable
    num_positions: Tensor  # () int64: positions with >= 1 target
    log_weights: Tensor  # (N, r) log w
    component_logp: Tensor  # (N, r) l_{t,a}
    responsibilities: Tensor  # (N, r) gamma (zero rows where no target)
    head_nll_sum: Tensor  # (n,) sum over positions of -log sum_a w_a P_a^(s)(x_{t+s})
    head_count: Tensor  # (n,) positions whose target s exists
    head_correct: Tensor | None  # (n,) argmax of the s-th marginal == target (when asked for)
    aux_loss: Tensor | None = None  # () differentiable L_aux, when the caller asks for it
    distill_kl_sum: Tensor | None = None  # () differentiable sum of KL(base || draft), when distilling


def _finish(log_w: Tensor, target_logp: Tensor, valid: Tensor) -> tuple[Tensor, ...]:
    """From log w (N, r), target log-probs (N, r, n) (0 where missing) and valid (N, n) to the
    per-position statistics shared by both implementations: per-row L_t and the s-th tokens' own
    marginal NLL (0 where there is nothing to predict), l, gamma and which rows have a target."""
    ell = log_w + target_logp.sum(dim=-1)  # (N, r)
    has_target = valid.any(dim=-1)  # (N,)
    nll = -torch.logsumexp(ell, dim=-1)  # (N,)
    nll = torch.where(has_target, nll, torch.zeros_like(nll))
    gamma = torch.softmax(ell, dim=-1) * has_target.unsqueeze(-1)  # (N, r)
    # Marginal of the s-th token alone: -log sum_a w_a P_a^(s)(x_{t+s}).
    head_nll = -torch.logsumexp(log_w.unsqueeze(-1) + target_logp, dim=1)  # (N, n)
    head_nll = torch.where(valid, head_nll, torch.zeros_like(head_nll))
    return nll, ell, gamma, has_target, head_nll


def _check_inputs(head: CPHead, h: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    h = h.reshape(-1, h.shape[-1])  # (N, d)
    targets = targets.reshape(-1, targets.shape[-1])  # (N, n)
    if targets.shape[0] != h.shape[0] or targets.shape[1] != head.horizon:
        raise ValueError(
            f"targets of shape {tuple(targets.shape)} do not match {h.shape[0]} positions x horizon {head.horizon}"
        )
    return h, targets


def naive_cp_loss(
    head: CPHead,
    h: Tensor,
    targets: Tensor,
    shared_unembedding: Tensor | None,
    *,
    with_accuracy: bool = False,
) -> CPLossOutput:
    """Reference implementation: materialises (N, r, n, V) log-probabilities.

    h: (..., d) trunk output; targets: (..., n) token ids, IGNORE_INDEX where missing.
    """
    h, targets = _check_inputs(head, h, targets)
    if head.num_local_components != head.rank:
        raise ValueError("the naive CP loss is a single-device reference: it needs all r components here")
    valid = targets != IGNORE_INDEX  # (N, n)
    log_w = head.gate_log_weights(h)  # (N, r)
    logp = head.all_factor_log_probs(h, shared_unembedding)  # (N, r, n, V)
    idx = targets.clamp_min(0)[:, None, :, None].expand(-1, head.rank, -1, 1)
    target_logp = logp.gather(-1, idx).squeeze(-1) * valid.unsqueeze(1)  # (N, r, n)
    nll, ell, gamma, has_target, head_nll = _finish(log_w, target_logp, valid)
    correct = None
    if with_accuracy:
        with torch.no_grad():
            mix = torch.logsumexp(log_w[:, :, None, None] + logp, dim=1)  # (N, n, V)
            correct = ((mix.argmax(-1) == targets) & valid).sum(0)
    return CPLossOutput(
        loss_sum=nll.sum(),
        num_positions=has_target.sum(),
        log_weights=log_w.detach(),
        component_logp=ell.detach(),
        responsibilities=gamma.detach(),
        head_nll_sum=head_nll.sum(0).detach(),
        head_count=valid.sum(0),
        head_correct=correct,
    )


def _chunks(n_rows: int, chunk: int) -> list[slice]:
    return [slice(i, min(i + chunk, n_rows)) for i in range(0, n_rows, chunk)]


class _ChunkedCPLoss(torch.autograd.Function):
    """loss_sum = sum_t L_t with gradients from the responsibility surrogate.

    Inputs after the non-tensor arguments: h (N, d), shared unembedding (V_local, d) or None, then the
    head's parameters in `names` order; they are routed through `apply` so that gradients reach them
    through autograd (and hence through DeepSpeed's gradient hooks), not by writing `.grad`.
    `vocab` is the vocabulary slice of this rank's unembeddings and `experts` its components (all of
    both on one device). Under expert parallelism the rows are those of the whole ep group (gathered),
    while the loss and statistics returned are this rank's own rows. `group` is how many components'
    features are computed together (None: as many as fit in about one chunk of logits).
    """

    @staticmethod
    def forward(
        ctx,
        head,
        names,
        targets,
        vocab,
        experts,
        chunk_tokens,
        with_accuracy,
        group,
        stats,
        h,
        unembed,
        *params,
    ):
        n_own = h.shape[0]
        own = experts.own_rows(n_own)
        h_all, targets_all = experts.gather_rows(h), experts.gather_rows(targets)  # (N_all, d), (N_all, n)
        valid = targets_all != IGNORE_INDEX  # (N_all, n)
        ldt = upcast(h[:0]).dtype  # loss dtype
        n_rows, r_loc, n, c0 = h_all.shape[0], head.num_local_components, head.horizon, head.component_start
        log_w = torch.empty(n_rows, head.rank, dtype=ldt, device=h.device)
        target_logp = torch.zeros(n_rows, r_loc, n, dtype=ldt, device=h.device)
        lse = torch.empty(n_rows, r_loc, n, dtype=ldt, device=h.device)  # log-normalisers, reused in backward
        hits = torch.zeros(n_rows, n, dtype=torch.bool, device=h.device)  # argmax of the s-th marginal right
        tgt = targets_all.clamp_min(0)
        weights = dict(zip(names, params, strict=True))
        groups = _component_groups(head, h, unembed, group)
        for rows in _chunks(n_rows, chunk_tokens):
            hc = h_all[rows]
            log_w[rows] = head.gate_log_weights(hc)
            for s in range(n):
                mix = None  # (rows, V_local): the s-th marginal, only for accuracy
                for comps in groups:
                    z = _group_features(head, hc, _phi_weights(weights, comps, s))  # (rows, k, d)
                    for j, a in enumerate(range(comps.start, comps.stop)):
                        u = weights["unembed"][a, s] if head.parameterisation == "separate" else unembed
                        logits = upcast(z[:, j] @ u.t())  # (rows, V_local)
                        lse[rows, a, s] = lz = vocab.logsumexp(logits)
                        target_logp[rows, a, s] = vocab.target_logit(logits, tgt[rows, s]) - lz
                        if with_accuracy:
                            term = logits.sub_(lz.unsqueeze(-1)).add_(log_w[rows, c0 + a : c0 + a + 1]).exp_()
                            mix = term if mix is None else mix.add_(term)
                if with_accuracy:
                    # Metrics only (log steps): the mixture over components needs an (rows, V_local) sum.
                    mix = experts.all_reduce_(mix)
                    hits[rows, s] = (vocab.argmax(mix) == targets_all[rows, s]) & valid[rows, s]
        target_logp *= valid.unsqueeze(1)
        target_logp = experts.gather_cols(target_logp)  # (N_all, r, n): every component's factors
        nll, ell, gamma, has_target, head_nll = _finish(log_w, target_logp, valid)
        ctx.head, ctx.names, ctx.chunk_tokens, ctx.vocab, ctx.experts = (
            head,
            names,
            chunk_tokens,
            vocab,
            experts,
        )
        ctx.n_own, ctx.h_requires_grad, ctx.groups = n_own, h.requires_grad, groups
        ctx.save_for_backward(h_all, unembed, targets_all, gamma, lse, *params)
        log_w, ell, gamma_own = log_w[own], ell[own], gamma[own]
        ctx.mark_non_differentiable(ell, gamma_own, log_w)
        # Statistics leave through a plain dict: they need no gradient and exist under no_grad too.
        stats.update(num_positions=has_target[own].sum(), head_nll_sum=head_nll[own].sum(0))
        stats.update(head_count=valid[own].sum(0), head_correct=hits[own].sum(0) if with_accuracy else None)
        return nll[own].sum(), log_w, ell, gamma_own

    @staticmethod
    def backward(ctx, grad_loss, _g_logw, _g_ell, _g_gamma):
        h_all, unembed, targets, gamma, lse, *params = ctx.saved_tensors
        head, names, vocab, experts, n_own = ctx.head, ctx.names, ctx.vocab, ctx.experts, ctx.n_own
        own, need_h = experts.own_rows(n_own), ctx.h_requires_grad
        weights = {k: p.detach() for k, p in zip(names, params, strict=True)}
        # fp32 accumulators of what receives gradient; each factor adds into its own slice.
        acc = {k: torch.zeros_like(upcast(p)) for k, p in zip(names, params, strict=True) if p.requires_grad}
        if unembed is not None and unembed.requires_grad:
            acc["<shared unembedding>"] = torch.zeros_like(upcast(unembed))
        grad_h_all = torch.zeros_like(upcast(h_all)) if need_h else None  # factors: every gathered row
        # Rows of peer k belong to peer k's loss, which received peer k's upstream gradient.
        upstream = experts.gather_rows(grad_loss.reshape(1).to(gamma.dtype)).repeat_interleave(n_own)
        scale = gamma * upstream.unsqueeze(-1)  # (N_all, r): d loss / d log w_a and d log P_a^(s)
        back = _FactorBackward(head, weights, unembed, acc, vocab, lse, targets, scale)
        for rows in _chunks(h_all.shape[0], ctx.chunk_tokens):
            back.chunk(rows, h_all[rows], None if grad_h_all is None else grad_h_all[rows], ctx.groups)
        # Under tp the feature gradients are one vocabulary shard's partial sums. Everything computed from
        # them (the gradients of h and of phi) is linear in them, so those are summed over the shards once
        # here: O(tokens * d + |phi|) per step instead of per factor.
        if vocab.world > 1:
            if need_h:
                vocab.all_reduce_(grad_h_all)
            for k in acc:
                if k.startswith("phi_"):
                    vocab.all_reduce_(acc[k])
        grad_h = experts.sum_to_owner(grad_h_all, n_own) if need_h else None

        # The gate (replicated): this rank's own rows.  d(-sum_a gamma_a log w_a) / d log w = -gamma
        leaves = {k: p.requires_grad_(k in acc) for k, p in weights.items()}
        gate = [k for k in leaves if k.startswith("gate.") and k in acc]
        h_own = h_all[own]
        for rows in _chunks(n_own, ctx.chunk_tokens) if need_h or gate else []:
            hc = h_own[rows].detach().requires_grad_(need_h)
            with torch.enable_grad():
                log_w = _call(head, leaves, "gate_log_weights", hc)  # (rows, r)
            grads = list(
                torch.autograd.grad(log_w, [hc] * need_h + [leaves[k] for k in gate], -scale[own][rows])
            )
            if need_h:
                grad_h[rows] += upcast(grads.pop(0))
            for k, g in zip(gate, grads, strict=True):
                acc[k] += upcast(g)

        grad_params = [acc[k].to(p.dtype) if k in acc else None for k, p in zip(names, params, strict=True)]
        grad_u = acc["<shared unembedding>"].to(unembed.dtype) if "<shared unembedding>" in acc else None
        grad_h = None if grad_h is None else grad_h.to(h_all.dtype)
        return (None, None, None, None, None, None, None, None, None, grad_h, grad_u, *grad_params)


def _component_groups(head: CPHead, h: Tensor, unembed: Tensor | None, group: int | None) -> list[slice]:
    """The local components cut into groups whose features are computed together: one each under
    `separate` (its features are h), else `group`, by default as many as keep a group's features and
    their activations, (rows, k, 2d + 2 hid), within about one chunk of logits (rows, V_local)."""
    r_loc = head.num_local_components
    if head.parameterisation == "separate":
        group = 1
    elif group is None:
        hid = head.phi_w1.shape[2] if head.phi_kind == "residual" else 0
        group = (unembed.shape[0] if unembed is not None else head.vocab_size) // (h.shape[-1] + hid)
    group = max(1, min(group, r_loc))
    return [slice(a, min(a + group, r_loc)) for a in range(0, r_loc, group)]


def _phi_weights(weights: dict[str, Tensor], comps: slice, s: int) -> dict[str, Tensor]:
    """The φ tensors of the local components `comps` at head position s (empty under `separate`)."""
    return {k: w[comps, s] for k, w in weights.items() if k.startswith("phi_")}


def _group_features(head: CPHead, hc: Tensor, phi_weights: dict[str, Tensor]) -> Tensor:
    """phi_{a,s}(hc) for a group of components: (rows, d) -> (rows, k, d); h itself under `separate` (one
    component per group)."""
    if head.parameterisation == "separate":
        return hc.unsqueeze(1)
    return head.phi(hc, phi_weights)


def _addmm_(acc: Tensor, x: Tensor, y: Tensor) -> None:
    """acc += x @ y in place (fused when the dtypes agree; else the product in x's dtype, upcast)."""
    if x.dtype == acc.dtype:
        acc.addmm_(x, y)
    else:
        acc += upcast(x @ y)


class _FactorBackward:
    """The components' part of the chunked loss's backward, one chunk of rows at a time.

    Per factor (a, s), logits = phi_{a,s}(h) @ U^T receive the closed-form gradient
    g = gamma_a * (softmax - onehot(x_{t+s})) (zero where the target is missing); then
    dU += g^T phi (into U_a^(s)'s own slice under `separate`) and dphi = g U. The features of a group
    of components are differentiated with autograd once per group, with respect to h and the group's
    slices of the phi weights only: no tensor of the size of all components is formed per factor.
    """

    def __init__(self, head, weights, unembed, acc, vocab, lse, targets, scale) -> None:
        self.head, self.weights, self.acc, self.vocab = head, weights, acc, vocab
        self.unembed = None if unembed is None else unembed.detach()
        self.lse, self.targets, self.scale = lse, targets, scale  # (N, r_loc, n), (N, n), (N, r)

    def logit_grad(self, logits: Tensor, rows: slice, a: int, s: int) -> Tensor:
        """d(-gamma log softmax(logits)[x]) / d logits = gamma * (softmax - onehot(x)), fp32."""
        g = upcast(logits).sub_(self.lse[rows, a, s].unsqueeze(-1)).exp_()
        tgt = self.targets[rows, s]
        self.vocab.subtract_onehot_(g, tgt.clamp_min(0))
        g *= (self.scale[rows, self.head.component_start + a] * (tgt != IGNORE_INDEX)).unsqueeze(-1)
        return g

    def chunk(self, rows: slice, hc: Tensor, grad_h: Tensor | None, groups: list[slice]) -> None:
        """Add the chunk's gradients into the accumulators and into grad_h (the chunk's rows, fp32)."""
        separate, acc_u = self.head.parameterisation == "separate", self.acc.get("<shared unembedding>")
        for s in range(self.head.horizon):
            for comps in groups:
                if separate:  # features = h: its gradient is g U, added straight into grad_h
                    acc = self.acc.get("unembed")
                    for a in range(comps.start, comps.stop):
                        u_acc = None if acc is None else acc[a, s]
                        self.factor(rows, a, s, hc, self.weights["unembed"][a, s], u_acc, grad_h)
                    continue
                leaves = {
                    k: w.detach().requires_grad_(k in self.acc)
                    for k, w in _phi_weights(self.weights, comps, s).items()
                }
                hl = hc.detach().requires_grad_(grad_h is not None)
                inputs = [x for x in (hl, *leaves.values()) if x.requires_grad]
                with torch.enable_grad():
                    z = _group_features(self.head, hl, leaves)  # (rows, k, d)
                grad_z = torch.zeros_like(z) if inputs else None
                for j, a in enumerate(range(comps.start, comps.stop)):
                    out = None if grad_z is None else grad_z[:, j]
                    self.factor(rows, a, s, z[:, j].detach(), self.unembed, acc_u, out)
                if not inputs:
                    continue
                grads = list(torch.autograd.grad(z, inputs, grad_z))
                if grad_h is not None:
                    grad_h += upcast(grads.pop(0))
                for k, g in zip([k for k, x in leaves.items() if x.requires_grad], grads, strict=True):
                    self.acc[k][comps, s] += upcast(g)

    @torch.no_grad()
    def factor(
        self, rows: slice, a: int, s: int, z: Tensor, u: Tensor, u_acc: Tensor | None, grad_z: Tensor | None
    ) -> None:
        """One factor: u_acc += g^T z (U's accumulator, U_a^(s)'s own slice under `separate`; None when U is
        frozen) and grad_z += g U, where g is the gradient of logits = z U^T (in U's dtype, as the forward)."""
        g = self.logit_grad(z @ u.t(), rows, a, s).to(u.dtype)  # (rows, V_local)
        if u_acc is not None:
            _addmm_(u_acc, g.t(), z)
        if grad_z is not None:
            _addmm_(grad_z, g, u)


class _Method(torch.nn.Module):
    """Exposes one method of the head as `forward`, so that `functional_call` can swap its params."""

    def __init__(self, head: CPHead, method: str) -> None:
        super().__init__()
        self.head, self.method = head, method

    def forward(self, *args):
        return getattr(self.head, self.method)(*args)


def _call(head: CPHead, leaves: dict[str, Tensor], method: str, *args) -> Tensor:
    """Call `head.<method>(*args)` with its parameters replaced by `leaves` (fresh autograd leaves,
    so that no hook registered on the real parameters fires during the recomputation)."""
    params = {f"head.{k}": v for k, v in leaves.items()}
    return functional_call(_Method(head, method), params, args, strict=True, tie_weights=False)


def chunked_cp_loss(
    head: CPHead,
    h: Tensor,
    targets: Tensor,
    shared_unembedding: Tensor | None,
    *,
    chunk_tokens: int = 4096,
    with_accuracy: bool = False,
    vocab: VocabShard = LOCAL,
    experts: ExpertShard = LOCAL_EXPERTS,
    group: int | None = None,
) -> CPLossOutput:
    """Exact CP loss whose peak logit memory is (chunk_tokens, V_local); same values and gradients as
    `naive_cp_loss`.  h: (..., d); targets: (..., n). Under tensor parallelism the unembeddings hold
    the vocabulary slice `vocab` and the loss is vocabulary-parallel; under expert parallelism the head
    holds the components of `experts` and the ep group's rows are scored together (see
    `parallel/experts.py`). `group`: components whose `shared` features are computed together (None:
    as many as fit in about one chunk of logits)."""
    h, targets = _check_inputs(head, h, targets)
    names, params = zip(*head.named_parameters(), strict=True)
    if head.parameterisation == "separate":
        shared_unembedding = None  # unused: it must receive no gradient (not even zeros)
    stats: dict[str, Tensor | None] = {}
    loss_sum, log_w, ell, gamma = _ChunkedCPLoss.apply(
        head,
        names,
        targets,
        vocab,
        experts,
        chunk_tokens,
        with_accuracy,
        group,
        stats,
        h,
        shared_unembedding,
        *params,
    )
    return CPLossOutput(
        loss_sum=loss_sum, log_weights=log_w, component_logp=ell, responsibilities=gamma, **stats
    )


def cp_loss(
    head: CPHead,
    h: Tensor,
    targets: Tensor,
    shared_unembedding: Tensor | None,
    *,
    impl: str = "chunked",
    chunk_tokens: int = 4096,
    with_accuracy: bool = False,
    vocab: VocabShard = LOCAL,
    experts: ExpertShard = LOCAL_EXPERTS,
) -> CPLossOutput:
    """Dispatch on `model.cp.loss_impl`."""
    if impl == "naive":
        if vocab.world > 1 or experts.world > 1:
            raise ValueError(
                "model.cp.loss_impl='naive' is a single-device reference: use 'chunked' with tp > 1"
            )
        return naive_cp_loss(head, h, targets, shared_unembedding, with_accuracy=with_accuracy)
    if impl == "chunked":
        return chunked_cp_loss(
            head,
            h,
            targets,
            shared_unembedding,
            chunk_tokens=chunk_tokens,
            with_accuracy=with_accuracy,
            vocab=vocab,
            experts=experts,
        )
    raise ValueError(f"model.cp.loss_impl={impl!r} is not one of 'chunked', 'naive'")


def load_balancing_loss(log_weights: Tensor, responsibilities: Tensor, has_target: Tensor) -> Tensor:
    """L_aux = r * sum_a f_a * mean_w_a over the positions that have a target.

    log_weights: (N, r) differentiable log w; responsibilities: (N, r) detached gamma; f_a is the
    fraction of positions whose responsibility is largest at a. Only mean_w carries gradient.
    """
    r = log_weights.shape[-1]
    m = has_target.float().unsqueeze(-1)  # (N, 1)
    count = m.sum().clamp_min(1.0)
    mean_w = (log_weights.exp() * m).sum(0) / count  # (r,)
    top = F.one_hot(responsibilities.argmax(-1), r).float()
    f = (top * m).sum(0) / count  # (r,)
    return r * (f * mean_w).sum()


# --------------------------------------------------------------------------------------------------
# Distillation (head-only fine-tuning)


def draft_cross_entropy(log_w: Tensor, logits: Tensor, targets: Tensor, p: Tensor) -> Tensor:
    """sum over rows t and head positions s whose target exists of -sum_v p_s(v) log q_s(v), where q_s is
    the draft's conditional of x_{t+s} given the true prefix (teacher forcing):

        q_s = sum_a pi_a^(s) P_a^(s),   pi^(s) ∝ w_a prod_{j<s, target j exists} P_a^(j)(x_{t+j})

    log_w: (N, r) gate log-weights; logits: (N, r, n, V) of the factors P; targets: (N, n) with IGNORE_INDEX
    where missing (such a token is marginalised out of the prefix, as in the loss); p: (N, n, V) target
    distributions (a constant). Since q_s(x_{t+s}) chains to the joint, with p_s the one-hot of x_{t+s} this is
    sum_t L_t. Gradients in closed form (`_DraftCrossEntropy`)."""
    return _DraftCrossEntropy.apply(log_w, logits, targets, p)


class _DraftCrossEntropy(torch.autograd.Function):
    """`draft_cross_entropy` with the closed-form gradient (docs/FINETUNE.md, "The loss"): with rho_{a,s}(v) = pi_{a,s} P_{a,s}(v) / q_s(v),
    R_{a,s} = sum_v p_s(v) rho_{a,s}(v), G_{a,s} = -(R_{a,s} - pi_{a,s}) (the gradient at the log-weight of a
    in pi^(s)) and H_{a,s} = sum_{s' > s} G_{a,s'} (the later positions' pull on the prefix token x_{t+s}):

        d/d log w_a   = sum_s G_{a,s}
        d/d z_{a,s,v} = -p_s(v) rho_{a,s}(v) + H_{a,s} [v = x_{t+s}] + P_{a,s}(v) (R_{a,s} - H_{a,s})

    for the logits z (every term only where the target of s exists). The mixture is summed in probability
    space (P = softmax(z) once, q = sum_a pi_a P_a), which the backward reuses; autograd through the same
    formula would keep several (N, r, n, V) tensors and walk each of them more often.

    log_w: (N, r); logits: (N, r, n, V); targets: (N, n) with IGNORE_INDEX where missing; p: (N, n, V)
    the base's probabilities (a constant)."""

    @staticmethod
    def forward(ctx, log_w: Tensor, logits: Tensor, targets: Tensor, p: Tensor) -> Tensor:
        valid = targets != IGNORE_INDEX  # (N, n)
        z = upcast(logits)
        lse = torch.logsumexp(z, -1, keepdim=True)  # (N, r, n, 1)
        probs = (z - lse).exp_()  # (N, r, n, V): P
        idx = targets.clamp_min(0)[:, None, :, None].expand(-1, z.shape[1], -1, 1)
        target_logp = (z.gather(-1, idx) - lse).squeeze(-1) * valid.unsqueeze(1)  # (N, r, n)
        prefix = target_logp.cumsum(-1) - target_logp  # (N, r, n): sum over j < s
        pi = (upcast(log_w).unsqueeze(-1) + prefix).softmax(1)  # (N, r, n)
        q = torch.zeros_like(probs[:, 0])  # (N, n, V): sum_a pi_a P_a, a component at a time
        for a in range(z.shape[1]):
            q.addcmul_(pi[:, a].unsqueeze(-1), probs[:, a])
        q.clamp_min_(torch.finfo(q.dtype).tiny)  # a q below the smallest normal number counts as that number
        ce = -(p * q.log()).sum(-1) * valid  # (N, n)
        ctx.save_for_backward(probs, pi, q, p, valid, idx)
        ctx.dtypes = (log_w.dtype, logits.dtype)
        return ce.sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        probs, pi, q, p, valid, idx = ctx.saved_tensors
        m = valid.unsqueeze(1).to(probs.dtype)  # (N, 1, n)
        p_rho = (probs * (p / q).unsqueeze(1)).mul_(pi.unsqueeze(-1))  # (N, r, n, V): p_s rho_{a,s}
        big_r = p_rho.sum(-1)  # (N, r, n)
        g = -(big_r - pi) * m  # (N, r, n)
        later = (g.flip(-1).cumsum(-1).flip(-1) - g) * m  # H: sum over s' > s
        grad_z = p_rho.mul_(-m.unsqueeze(-1)).addcmul_(probs, (big_r * m - later).unsqueeze(-1))
        grad_z.scatter_add_(-1, idx, later.unsqueeze(-1))
        w_dtype, z_dtype = ctx.dtypes
        return (grad * g.sum(-1)).to(w_dtype), (grad * grad_z).to(z_dtype), None, None


def distillation_kl_sum(
    head: CPHead,
    h: Tensor,
    targets: Tensor,
    shared_unembedding: Tensor | None,
    teacher_log_probs: Callable[[Tensor], Tensor],
    *,
    chunk_tokens: int = 4096,
) -> Tensor:
    """sum over positions t and head positions s whose target exists of KL(p_s || q_s), fp32.

    q_s is the draft's conditional of x_{t+s} given the true prefix x_{t+1..t+s-1}
    (`draft_cross_entropy`); p_s is the base model's next-token distribution of the same token,
    `teacher_log_probs` (rows, d) -> (rows, V) at position t+s-1 of the same sequence (computed from the
    same hidden states: the trunk is frozen and shared). A term whose position t+s-1 lies outside the
    sequence is dropped. Divide by the same count as the CP loss (positions with >= 1 target).

    h: (B, T, d) trunk output; targets: (B, T, n). Gradients reach the head (gate included) and, if
    they require grad, h and the shared unembedding; never the teacher.

    Note: memory. Each chunk of `chunk_tokens` rows materialises (rows, r, n, V) logits and probabilities,
    one chunk at a time: with gradients wanted, each chunk's gradient is computed right after its value
    (`_DistillationKL`), so nothing of a chunk outlives it. Single device: all r components and the whole
    vocabulary must be here (no tp, ep or pp).
    """
    if h.dim() != 3 or targets.shape[:2] != h.shape[:2] or targets.shape[-1] != head.horizon:
        raise ValueError(
            f"distillation needs h (B, T, d) and targets (B, T, {head.horizon}); got {tuple(h.shape)} and "
            f"{tuple(targets.shape)}"
        )
    if head.num_local_components != head.rank:
        raise ValueError("distillation is single-device: it needs all r components here (ep = 1)")
    b, t_len, n = targets.shape
    if head.parameterisation == "separate":
        shared_unembedding = None
    # Position of the teacher row of each (t, s) inside its sequence: t + s - 1 must exist.
    pos = torch.arange(t_len, device=targets.device)[:, None] + torch.arange(n, device=targets.device)
    valid = (targets != IGNORE_INDEX) & (pos < t_len)  # (B, T, n)
    targets = torch.where(valid, targets, torch.full_like(targets, IGNORE_INDEX)).reshape(-1, n)
    h = h.reshape(-1, h.shape[-1])  # (N, d)
    n_rows = h.shape[0]

    def chunk_kl(leaves: dict[str, Tensor], h_win: Tensor, rows: slice, unembed: Tensor | None) -> Tensor:
        # h_win: the chunk's rows and the n - 1 after them (teacher positions t + s - 1).
        k = rows.stop - rows.start
        hc, tg = h_win[:k], targets[rows]  # (k, d), (k, n)
        with torch.no_grad():
            base = upcast(teacher_log_probs(h_win.detach()))  # (k + n - 1 or fewer, V)
            base = F.pad(base, (0, 0, 0, k + n - 1 - base.shape[0]))  # rows past the end are never used
            # log p_s at row i: teacher row i + s (window offset), i.e. position t + s - 1.
            log_p = base.unfold(0, n, 1)[:k].transpose(1, 2)  # (k, n, V)
            p = log_p.exp()
            ent = (p * log_p).sum(-1)  # (k, n): sum_v p log p (KL's constant part)
        logits = _call(head, leaves, "factor_logits_at", hc, unembed, slice(None))  # (k, r, n, V)
        log_w = _call(head, leaves, "gate_log_weights", hc)
        cross = draft_cross_entropy(log_w, logits, tg, p)
        return torch.where(tg != IGNORE_INDEX, ent, torch.zeros_like(ent)).sum() + cross

    names, params = zip(*head.named_parameters(), strict=True)
    windows = [
        (rows, slice(rows.start, min(rows.stop + n - 1, n_rows))) for rows in _chunks(n_rows, chunk_tokens)
    ]
    wanted = [h, shared_unembedding, *params]
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in wanted):
        return _DistillationKL.apply(chunk_kl, names, windows, h, shared_unembedding, *params)
    leaves = dict(zip(names, params, strict=True))
    total = torch.zeros((), dtype=upcast(h[:0]).dtype, device=h.device)
    for rows, win in windows:
        total = total + chunk_kl(leaves, h[win], rows, shared_unembedding)
    return total


class _DistillationKL(torch.autograd.Function):
    """`distillation_kl_sum` with its gradient computed chunk by chunk in the forward: the output is one
    number, so its gradient is the upstream one times the forward's own, and each chunk's (rows, r, n, V)
    tensors are built once (a backward pass would have to build them again). Inputs after the non-tensor
    arguments: h (N, d), the shared unembedding or None, the head's parameters in `names` order (routed
    through `apply` so that gradients reach them through autograd, as in `_ChunkedCPLoss`)."""

    @staticmethod
    def forward(ctx, chunk_kl, names, windows, h, unembed, *params):
        leaves = {k: p.detach().requires_grad_(p.requires_grad) for k, p in zip(names, params, strict=True)}
        u = None if unembed is None else unembed.detach().requires_grad_(unembed.requires_grad)
        wrt = [x for x in (u, *leaves.values()) if x is not None and x.requires_grad]
        acc = [torch.zeros_like(upcast(x)) for x in wrt]
        grad_h = torch.zeros_like(upcast(h)) if h.requires_grad else None
        total = torch.zeros((), dtype=upcast(h[:0]).dtype, device=h.device)
        for rows, win in windows:
            h_win = h[win].detach().requires_grad_(h.requires_grad)
            with torch.enable_grad():
                part = chunk_kl(leaves, h_win, rows, u)
            grads = torch.autograd.grad(part, [h_win] * h.requires_grad + wrt, allow_unused=True)
            if h.requires_grad:
                grad_h[win] += upcast(grads[0]) if grads[0] is not None else 0
                grads = grads[1:]
            for a, g in zip(acc, grads, strict=True):
                if g is not None:
                    a += upcast(g)
            total += part.detach()
        ctx.grad_h = None if grad_h is None else grad_h.to(h.dtype)
        ctx.grads = [a.to(x.dtype) for a, x in zip(acc, wrt, strict=True)]
        ctx.wants = [x is not None and x.requires_grad for x in (u, *leaves.values())]
        return total

    @staticmethod
    def backward(ctx, grad):
        grads = iter(ctx.grads)
        found = [grad * next(grads) if want else None for want in ctx.wants]
        grad_h = None if ctx.grad_h is None else grad * ctx.grad_h
        return (None, None, None, grad_h, *found)
