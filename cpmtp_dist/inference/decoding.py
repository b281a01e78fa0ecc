"""Decoding one sequence with a KV cache: plain autoregressive, self-speculative, or tree (docs/MODEL.md).

All modes run the same loop. Each step has a *first* token (from the model's own next-token distribution
at the last accepted position, or the correction of the previous step's rejection) and, after it, the CP
head's drafts: none (autoregressive), one chain of up to n - 1 tokens (speculative), or a tree (tree mode:
the first token's top-k / k sampled children, each continued as its own chain of the mixture). The trunk
runs once over the step's tokens (a tree with a tree attention mask), which gives the verifier's
next-token distribution after each. Starting at the first token, a child is kept when it passes its test
against the verifier at its parent (greedy: equal to the verifier's argmax; sampling: recursive rejection
sampling over the children in the order they were drawn, `multi_draft_accept`; one child is plain
speculative sampling), and the walk goes on from it. The KV cache keeps the accepted path and the next step
starts from its last token; a rejection's correction is the next step's first token.

Context window: the cache holds at most `capacity` positions (the trunk's trained sequence length by
default). When it is full, it is refilled with the last capacity / 2 tokens and decoding continues; a
step never verifies past the end of the window. The window therefore depends only on the absolute
position of a token, in every mode, which keeps greedy drafted decoding identical to greedy
autoregressive decoding for outputs of any length.

Counts: a *forward* is one trunk call after the prompt's prefill (window refills are counted apart);
tokens per forward is the accepted tokens per forward (1 in autoregressive mode, at most n). The last
token of an output is taken from the last forward's distribution without a forward of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cpmtp_dist.inference.kv_cache import KVCache
from cpmtp_dist.inference.sampling import Sampling, multi_draft_accept
from cpmtp_dist.model.cp_head import upcast
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.model.drafting import first_token_factors, greedy_tree, sampled_tree

MODES = ("ar", "speculative", "tree")


@dataclass
class DecodeStats:
    mode: str
    horizon: int
    branches: int = 1  # tree mode: children of each step's first token
    new_tokens: int = 0
    forwards: int = 0
    accepted: int = 0
    refills: int = 0
    seconds: float = 0.0
    tested: list[int] = field(default_factory=list)  # per head position s: steps that tested draft s
    passed: list[int] = field(default_factory=list)  # ... and kept it
    # tree mode: steps whose kept second token was child b
    kept_branch: list[int] = field(default_factory=list)

    @property
    def tokens_per_forward(self) -> float:
        return self.accepted / self.forwards if self.forwards else float("nan")

    @property
    def acceptance(self) -> list[float]:
        """Share of the tested drafts kept, per head position (position 1 is always kept)."""
        return [p / t if t else float("nan") for p, t in zip(self.passed, self.tested, strict=True)]

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "branches": self.branches,
            "new_tokens": self.new_tokens,
            "forwards": self.forwards,
            "accepted": self.accepted,
            "tokens_per_forward": self.tokens_per_forward,
            "acceptance": self.acceptance,
            "tested": self.tested,
            "passed": self.passed,
            "kept_branch": self.kept_branch,
            "refills": self.refills,
            "seconds": self.seconds,
        }


@dataclass
class Decoded:
    tokens: list[int]  # the new tokens only
    stats: DecodeStats


@dataclass
class _Step:
    """One step's tokens as a tree in node order: node 0 is the first token, `parents[i]` < i, and
    `children[i]` lists node i's children in the order they were drawn from `log_q[i]` (sampling)."""

    tokens: list[int]
    parents: list[int]
    children: dict[int, list[int]]
    log_q: dict[int, Tensor]


@dataclass
class _Position:
    """The head at the last accepted position h (1, d): the gate (r,), the first factors (r, V) and the
    next-token marginal (V,). Greedy decoding holds probabilities (its argmaxes need no logarithms),
    sampling log-probabilities."""

    h: Tensor
    gate: Tensor
    first: Tensor
    marginal: Tensor


class Decoder:
    """Decodes with one model in one process (tp = pp = ep = 1), batch 1."""

    def __init__(self, model: CPModel, capacity: int | None = None) -> None:
        model._single_device()
        if model.head is None:
            raise ValueError("the model has no CP head")
        self.model = model
        self.device = next(model.parameters()).device  # token tensors and generators live there too
        self.dtype = next(model.parameters()).dtype
        self.head = model.head
        self.horizon = model.head.horizon
        self.capacity = capacity or model.cfg.trunk.seq_length
        if self.capacity < 2:
            raise ValueError(f"a decoding window of {self.capacity} positions is too short")
        self.cache = KVCache(model.trunk, self.capacity)

    def _head(self, h: Tensor, greedy: bool) -> tuple[Tensor, Tensor, Tensor]:
        """Gate (N, r), first factors (N, r, V) and next-token marginal (N, V) at h (N, d), fp32:
        probabilities when greedy, else log-probabilities."""
        if not greedy:
            return first_token_factors(self.head, h, self.model.unembedding())
        w = torch.softmax(upcast(self.head.gate(h)), dim=-1)
        logits = self.head.factor_logits_at(h, self.model.unembedding(), slice(0, 1))[:, :, 0]
        probs = torch.softmax(logits, dim=-1)
        return w, probs, (w.unsqueeze(1) @ probs).squeeze(1)

    def _tokens(self, ids: list[int]) -> Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def _refill(self, ids: list[int], stats: DecodeStats) -> None:
        keep = ids[-max(1, self.capacity // 2) :]
        self.cache.reset()
        self.cache.extend(self._tokens(keep))
        stats.refills += 1

    def _draft(self, first: int, at: _Position, depth: int, branches: int, sampling: Sampling, gen) -> _Step:
        """The step's tree: the first token, then `branches` chains of `depth` drafted tokens each."""
        if depth == 0:
            return _Step([first], [-1], {}, {})
        greedy = sampling.greedy
        logits = self.head.factor_logits_at(at.h, self.model.unembedding(), slice(1, 1 + depth))[0]
        rest = torch.softmax(logits, dim=-1) if greedy else torch.log_softmax(logits, dim=-1)
        sampled = None
        if greedy:
            pi = at.gate * at.first[:, first]  # the gate reweighted by the first token
            chains = greedy_tree(pi / pi.sum(), rest, branches).tolist()
        else:
            sampled = sampled_tree(at.gate + at.first[:, first], rest, branches, generator=gen,
                                   transform=sampling.transform)  # fmt: skip
            chains = sampled.tokens.tolist()
        step = _Step([first], [-1], {0: []}, {} if sampled is None else {0: sampled.root_log_q})
        for b, chain in enumerate(chains):
            for j, token in enumerate(chain):  # node 1 + b * depth + j
                node = len(step.tokens)
                parent = 0 if j == 0 else node - 1
                step.tokens.append(token)
                step.parents.append(parent)
                step.children.setdefault(parent, []).append(node)
                if j > 0 and sampled is not None:
                    step.log_q[parent] = sampled.log_q[b, j - 1]
        return step

    def _verify(
        self, step: _Step, marginal: Tensor, sampling: Sampling, gen, stats: DecodeStats
    ) -> tuple[list[int], int | None]:
        """Walk the tree from node 0 against the verifier's next-token marginals at its nodes (m, V;
        `_head`'s): the kept path (node indices) and, after a rejection, the correction token."""
        best = marginal.argmax(dim=-1).tolist() if sampling.greedy else None
        path, node = [0], 0
        stats.tested[0] += 1
        stats.passed[0] += 1
        while kids := step.children.get(node):
            depth = len(path)
            stats.tested[depth] += 1
            if best is not None:
                hits = [c for c in kids if step.tokens[c] == best[node]]
                if not hits:
                    return path, None
                node = hits[0]
            else:
                log_p = sampling.transform(marginal[node])
                i, token = multi_draft_accept(log_p, step.log_q[node], [step.tokens[c] for c in kids], gen)
                if i is None:
                    return path, token
                node = kids[i]
            if depth == 1:
                stats.kept_branch[kids.index(node)] += 1
            stats.passed[depth] += 1
            path.append(node)
        return path, None

    @torch.inference_mode()
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        *,
        mode: str = "ar",
        branches: int = 2,
        sampling: Sampling | None = None,
        eos_id: int | None = None,
        seed: int = 0,
    ) -> Decoded:
        """`branches`: tree mode's children of each step's first token (the other modes draft one chain)."""
        if mode not in MODES:
            raise ValueError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
        if branches < 1:
            raise ValueError(f"--branches {branches}: must be >= 1")
        if not prompt:
            raise ValueError("the prompt encodes to no tokens: give a non-empty prompt")
        sampling = sampling or Sampling()
        gen = None if sampling.greedy else torch.Generator(device=self.device).manual_seed(seed)
        n = 1 if mode == "ar" else self.horizon
        branches = branches if mode == "tree" else 1
        stats = DecodeStats(mode, n, branches, tested=[0] * n, passed=[0] * n, kept_branch=[0] * branches)
        start = time.perf_counter()

        greedy = sampling.greedy
        ids = list(prompt)
        self.cache.reset()
        h = self.cache.extend(self._tokens(ids[-self.capacity :]))[-1:]
        at = _Position(h, *(x[0] for x in self._head(h, greedy)))
        forced: int | None = None
        out: list[int] = []
        while len(out) < max_new_tokens:
            remaining = max_new_tokens - len(out)
            if forced is not None:
                first = forced
            else:
                first = sampling.pick(at.marginal if greedy else sampling.transform(at.marginal), gen)
            if first == eos_id:
                break
            if remaining == 1:
                out.append(first)
                break
            if self.cache.length == self.capacity:
                self._refill(ids, stats)
            free = self.capacity - self.cache.length  # the step's tree must fit in the window
            depth = min(n - 1, remaining - 1, free - 1)
            step = self._draft(first, at, depth, min(branches, (free - 1) // max(depth, 1)), sampling, gen)
            base = self.cache.length
            hs = self.cache.extend(self._tokens(step.tokens), step.parents)
            stats.forwards += 1
            gate, first_factors, marginal = self._head(hs, greedy)
            path, forced = self._verify(step, marginal, sampling, gen, stats)
            accepted = [step.tokens[i] for i in path]
            stats.accepted += len(accepted)
            if eos_id in accepted:
                out.extend(accepted[: accepted.index(eos_id)])
                break
            out.extend(accepted)
            ids.extend(accepted)
            self.cache.keep(base, [base + i for i in path])
            last = path[-1]
            at = _Position(hs[last : last + 1], gate[last], first_factors[last], marginal[last])
        stats.new_tokens = len(out)
        stats.seconds = time.perf_counter() - start
        return Decoded(out, stats)
