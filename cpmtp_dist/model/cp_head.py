"""The rank-r CP multi-token head: parameters and per-component factor logits (docs/MODEL.md).

    P(x_{t+1..t+n} | h_t) = sum_a w_a(h_t) * prod_s P_a^(s)(x_{t+s} | h_t)

This module is plain single-device PyTorch and says *what* is computed. The losses live in
`cp_loss.py`, drafting in `drafting.py`; sharding the components over an expert-parallel group is
the business of `cpmtp_dist/parallel/`.

Parameters are stacked over (component a, head position s) so that the leading dimension is the
component (expert) dimension: expert parallelism shards dimension 0.

Note: symmetry breaking. Components that start identical receive identical gradients and stay
identical. Every component therefore gets its own random initialisation:
  - `shared` + `residual`: phi(h) = h + W2 SiLU(W1 h); W2 = 0 (each component starts as the base
    model), W1 ~ N(0, init_noise_std) independently per (a, s), so the W2 gradients differ.
  - `shared` + `linear`: phi(h) = W h with W = I + N(0, init_noise_std) per (a, s).
  - `separate`: U_a^(s) ~ N(0, init_noise_std) independently per (a, s).
The gate starts at zero (uniform mixture weights); it is the responsibilities, which differ once the
components differ, that drive it apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpmtp_dist.config import CPHeadConfig

IGNORE_INDEX = -1
"""Target value of a missing target (past the end of a sequence, padding, masked label)."""


def upcast(x: Tensor) -> Tensor:
    """The loss math runs in fp32 even for a bf16 trunk; fp64 inputs (tests) stay fp64."""
    return x if x.dtype == torch.float64 else x.float()


class CPHead(nn.Module):
    """Gate and component factors of the CP head.

    Args:
        hidden_size: d, width of the trunk's final hidden state.
        vocab_size: V.
        cfg: the head's config section (horizon n, rank r, parameterisation, ...).
        component_range: (start, end) of the components stored here (all r by default; r / ep of them
            under expert parallelism).
        vocab_range: (start, end) of the vocabulary slice whose `separate` unembeddings are stored here
            (all of V by default; a slice under tensor parallelism).
        params_dtype: dtype of the parameters (the loss math is fp32 regardless).

    Sharded parameters are drawn at full size and then sliced, so that every layout holds exactly the
    weights of the single-device model.
    """

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        cfg: CPHeadConfig,
        *,
        component_range: tuple[int, int] | None = None,
        vocab_range: tuple[int, int] | None = None,
        params_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.horizon = cfg.horizon
        self.rank = cfg.rank
        self.parameterisation = cfg.parameterisation
        self.phi_kind = cfg.phi
        c_lo, c_hi = component_range or (0, cfg.rank)
        v_lo, v_hi = vocab_range or (0, vocab_size)
        self._inference_weights: dict = {}  # weights_at's copies: {positions: (parameter stamps, weights)}
        self.component_start = c_lo
        self.num_local_components = c_hi - c_lo
        d, n, r = hidden_size, cfg.horizon, cfg.rank
        std = cfg.init_noise_std
        kw = {"dtype": params_dtype}

        # Gate over *all* r components (replicated under expert parallelism).
        self.gate = nn.Linear(d, r, bias=True, **kw)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)

        if cfg.parameterisation == "separate":
            full = torch.randn(r, n, vocab_size, d, **kw) * std
            self.unembed = nn.Parameter(full[c_lo:c_hi, :, v_lo:v_hi].clone())  # (r_local, n, V_local, d)
            if v_hi - v_lo < vocab_size:  # split over the vocabulary like Megatron's column-parallel weights
                self.unembed.tensor_model_parallel = True
                self.unembed.partition_dim = 2
                self.unembed.partition_stride = 1
        elif cfg.phi == "residual":
            hid = cfg.phi_hidden_size or d
            w1 = torch.randn(r, n, hid, d, **kw) * std
            self.phi_w1 = nn.Parameter(w1[c_lo:c_hi].clone())  # (r_local, n, hid, d)
            self.phi_w2 = nn.Parameter(torch.zeros(c_hi - c_lo, n, d, hid, **kw))  # (r_local, n, d, hid)
        elif cfg.phi == "linear":
            w = torch.eye(d, **kw).expand(r, n, d, d) + torch.randn(r, n, d, d, **kw) * std
            self.phi_weight = nn.Parameter(w[c_lo:c_hi].clone())  # (r_local, n, d, d)
        else:
            raise ValueError(f"model.cp.phi={cfg.phi!r} is not one of 'residual', 'linear'")
        if self.num_local_components < r:
            for p in self.component_parameters():
                p.expert_parallel = True  # sharded over the expert-parallel group along dimension 0

    def component_parameters(self) -> list[nn.Parameter]:
        """The per-component tensors (leading dimension = local component), i.e. everything but the gate."""
        return [p for name, p in self.named_parameters() if not name.startswith("gate.")]

    # ----------------------------------------------------------------------------------------------
    def gate_log_weights(self, h: Tensor) -> Tensor:
        """log w(h) = log_softmax(G h + b), in fp32.  h: (N, d) -> (N, r)."""
        return F.log_softmax(upcast(self.gate(h)), dim=-1)

    def features(self, h: Tensor, a: int, s: int) -> Tensor:
        """phi_{a,s}(h) for local component a (0-based, of this rank's components) and head position s
        (0-based).  (N, d) -> (N, d).

        Under `separate` the features are h itself; the component lives in its unembedding.
        """
        if self.parameterisation == "separate":
            return h
        if self.phi_kind == "residual":
            return h + F.silu(h @ self.phi_w1[a, s].t()) @ self.phi_w2[a, s].t()
        return h @ self.phi_weight[a, s].t()

    def unembedding(self, a: int, s: int, shared_unembedding: Tensor | None) -> Tensor:
        """The (V, d) unembedding of factor (a, s): the shared U, or U_a^(s) under `separate`."""
        if self.parameterisation == "separate":
            return self.unembed[a, s]
        if shared_unembedding is None:
            raise ValueError("the `shared` parameterisation needs the trunk's unembedding weight")
        return shared_unembedding

    def factor_logits(self, h: Tensor, a: int, s: int, shared_unembedding: Tensor | None) -> Tensor:
        """logits_a^(s)(h): (N, d) -> (N, V), in the parameters' dtype."""
        return self.features(h, a, s) @ self.unembedding(a, s, shared_unembedding).t()

    def all_factor_log_probs(self, h: Tensor, shared_unembedding: Tensor | None) -> Tensor:
        """log P_a^(s)(. | h) for all local (a, s), fp32: (N, d) -> (N, r_local, n, V).

        Materialises r*n*V numbers per position: for the naive loss, references, drafting and small models.
        """
        return self.factor_log_probs(h, shared_unembedding, slice(None))

    def factor_log_probs(self, h: Tensor, shared_unembedding: Tensor | None, positions: slice) -> Tensor:
        """log P_a^(s)(. | h) for all local components a and the head positions s in `positions`, fp32:
        (N, d) -> (N, r_local, len(positions), V). Batched over (a, s): the decoding path."""
        return F.log_softmax(self.factor_logits_at(h, shared_unembedding, positions), dim=-1)

    def factor_logits_at(self, h: Tensor, shared_unembedding: Tensor | None, positions: slice) -> Tensor:
        """The logits of `factor_log_probs`, fp32: (N, d) -> (N, r_local, len(positions), V)."""
        r, n = self.num_local_components, self.horizon
        if self.parameterisation == "separate":
            wanted = range(n)[positions]
            if not wanted:
                return torch.empty(
                    h.shape[0], r, 0, self.unembed.shape[2], dtype=torch.float32, device=h.device
                )
            rows = [torch.stack([h @ self.unembed[a, s].t() for s in wanted], dim=1) for a in range(r)]
            return upcast(torch.stack(rows, dim=1))
        if shared_unembedding is None:
            raise ValueError("the `shared` parameterisation needs the trunk's unembedding weight")
        feats = self.features_at(h, positions)  # (N, r, p, d)
        return upcast(feats @ shared_unembedding.t())

    def features_at(self, h: Tensor, positions: slice) -> Tensor:
        """phi_{a,s}(h) of a `shared` head for every local component a and the head positions s in
        `positions`, as a few large products: (N, d) -> (N, r_local, p, d)."""
        return self.phi(h, self.weights_at(positions))

    def weights_at(self, positions: slice) -> dict[str, Tensor]:
        """`component_weights()` at the head `positions`. Under inference mode (decoding) as contiguous copies
        kept until a parameter changes (in place, or moved): the products of `phi` need them contiguous, and a
        decoder asks for the same positions at every step."""
        params = self.component_weights()
        if not torch.is_inference_mode_enabled() or any(p.is_inference() for p in params.values()):
            return {k: p[:, positions] for k, p in params.items()}
        key = (positions.start, positions.stop, positions.step)
        stamp = tuple((p._version, p.data_ptr(), p.device) for p in params.values())
        cached = self._inference_weights.get(key)
        if cached is None or cached[0] != stamp:
            cached = (stamp, {k: p[:, positions].contiguous() for k, p in params.items()})
            self._inference_weights[key] = cached
        return cached[1]

    def component_weights(self) -> dict[str, Tensor]:
        """The per-component tensors by parameter name (leading dimensions: local component, head position)."""
        return {k: p for k, p in self.named_parameters() if not k.startswith("gate.")}

    def phi(self, h: Tensor, weights: dict[str, Tensor]) -> Tensor:
        """phi(h) of a `shared` head under weights with any leading dimensions L (slices of
        `component_weights()`, e.g. [a0:a1, s]), as a few large products: (N, d) -> (N, *L, d)."""
        rows, d = h.shape
        if self.phi_kind == "residual":
            w1, w2 = weights["phi_w1"], weights["phi_w2"]  # (*L, hid, d), (*L, d, hid)
            lead, hid = w1.shape[:-2], w1.shape[-2]
            k = w1[..., 0, 0].numel()
            z = F.silu(h @ w1.reshape(k * hid, d).t())  # (N, k hid)
            z = z.view(rows, k, hid).transpose(0, 1)  # (k, N, hid)
            out = torch.bmm(z, w2.reshape(k, d, hid).transpose(1, 2))  # (k, N, d)
            return (h.unsqueeze(1) + out.transpose(0, 1)).reshape(rows, *lead, d)
        w = weights["phi_weight"]  # (*L, d, d)
        lead, k = w.shape[:-2], w[..., 0, 0].numel()
        return (h @ w.reshape(k * d, d).t()).view(rows, *lead, d)
