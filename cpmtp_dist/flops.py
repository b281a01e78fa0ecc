"""FLOPs per training token of the trunk and the CP head: what MFU and HFU count (`training/metrics.py`) and
what `cpmtp plan` ranks layouts by. No torch, so a login node plans without it."""

from __future__ import annotations

from dataclasses import dataclass

from cpmtp_dist.config import CPHeadConfig, ModelConfig, TrunkConfig

__all__ = ["FlopsPerToken", "flops_per_token", "forward_flops_per_token", "head_forward_parts"]


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token of one optimizer step."""

    model: float
    """The model's arithmetic (what MFU counts): forward + backward of what is trained, the forward of what
    is frozen."""
    hardware: float
    """What runs (what HFU counts): `model` plus the chunked CP loss's recomputation of the head's forward."""


def flops_per_token(cfg: ModelConfig, *, freeze_trunk: bool = False) -> FlopsPerToken:
    """Model and hardware FLOPs per training token (matmuls; norms and softmaxes are left out).

    Forward FLOPs are 2 per multiply-add; a trained part costs 3x its forward (forward, gradients for its
    inputs, gradients for its weights). A frozen trunk (`finetune.freeze_trunk`, its tied unembedding
    included) runs its forward only, and the head's backward then needs no gradient for the trunk's output:
    the gate's and the φ maps' weight gradients, the gradient through the frozen shared unembedding (or the
    weight gradient of a separate one), and inside a residual φ the gradient through W2. The chunked loss
    (`model.cp.loss_impl=chunked`) recomputes the head's factors in its backward: one more head forward in
    hardware FLOPs, none in model FLOPs. `tests/test_flops.py` checks every case against the matmuls a real
    step runs.
    """
    trunk, head = forward_flops_per_token(cfg)
    if freeze_trunk:
        gate, phi, unembed = head_forward_parts(cfg.cp, cfg.trunk)
        inner = 0.0 if cfg.cp.parameterisation == "separate" else (1.5 if cfg.cp.phi == "residual" else 1.0)
        model = trunk + head + gate + cfg.cp.rank * cfg.cp.horizon * (unembed + inner * phi)
    else:
        model = 3.0 * (trunk + head)
    recompute = head if cfg.cp.loss_impl == "chunked" else 0.0
    return FlopsPerToken(model=model, hardware=model + recompute)


def forward_flops_per_token(cfg: ModelConfig) -> tuple[float, float]:
    """Forward matmul FLOPs per token of the trunk (projections, MLP, attention scores and values) and of the
    CP head (gate, φ maps, r·n unembeddings)."""
    t, c = cfg.trunk, cfg.cp
    d, f, seq = t.hidden_size, t.ffn_hidden_size or 4 * t.hidden_size, t.seq_length
    kv = d * (t.num_query_groups or t.num_attention_heads) // t.num_attention_heads  # width of K (and of V)
    projections = 2 * d * d + 2 * d * kv  # Q and the output projection, K and V (grouped-query: kv < d)
    mlp = (3 if t.mlp == "swiglu" else 2) * d * f  # gate, up and down; or up and down
    per_layer = 2 * (projections + mlp) + 2 * 2 * seq * d  # projections + MLP + scores/values
    gate, phi, unembed = head_forward_parts(c, t)
    return float(t.num_layers * per_layer), gate + c.rank * c.horizon * (phi + unembed)


def head_forward_parts(c: CPHeadConfig, t: TrunkConfig) -> tuple[float, float, float]:
    """Forward FLOPs per token of the gate, of one factor's φ map, and of one factor's unembedding."""
    d = t.hidden_size
    if c.parameterisation == "separate":
        phi = 0
    elif c.phi == "residual":
        phi = 2 * 2 * d * (c.phi_hidden_size or d)
    else:
        phi = 2 * d * d
    return float(2 * d * c.rank), float(phi), float(2 * t.vocab_size * d)
