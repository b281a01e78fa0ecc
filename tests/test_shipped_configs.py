"""The shipped Llama-shape configs, built on the meta device (no memory, no FLOPs): the trunk's parameter count
against the published count of the model whose shape it takes, the CP head's against its formula.

Published: Llama-3.2-1B 1.236B parameters (embeddings tied), Llama-3-8B 8.030B (untied); the 125M config has no
published counterpart, so its trunk is checked against the formula below.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cpmtp_dist.config import ModelConfig
from cpmtp_dist.config_io import load_config, validate_config
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.parallel.state import initialize_parallel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# config -> (published trunk parameters, the precision it is published to)
PUBLISHED = {
    "llama_1b.yaml": (1.236e9, 0.0005e9),
    "llama_8b.yaml": (8.030e9, 0.0005e9),
    "llama_125m.yaml": None,
}


def trunk_formula(m: ModelConfig) -> int:
    """Embedding (and an untied output layer), per layer: Q, K, V, output projection, the MLP's two or three
    projections and two norm weights; the final norm."""
    t = m.trunk
    d, f, heads = t.hidden_size, t.ffn_hidden_size or 4 * t.hidden_size, t.num_attention_heads
    kv = d * (t.num_query_groups or heads) // heads
    layer = 2 * d * d + 2 * d * kv + (3 if t.mlp == "swiglu" else 2) * d * f + 2 * d
    return t.vocab_size * d * (2 if t.untie_embeddings else 1) + t.num_layers * layer + d


def head_formula(m: ModelConfig) -> int:
    """Gate (r × d weight, r biases) and the r·n residual maps (W1: hid × d, W2: d × hid)."""
    c, d = m.cp, m.trunk.hidden_size
    assert (c.parameterisation, c.phi) == ("shared", "residual")
    return c.rank * d + c.rank + c.rank * c.horizon * 2 * (c.phi_hidden_size or d) * d


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_shipped_llama_config_has_the_published_size(name):
    cfg = load_config(CONFIGS / name)
    # The documented layouts: one and two 8-GPU nodes.
    for world_size in (8, 16):
        validate_config(cfg, world_size=world_size, cuda_available=True)
    assert (cfg.model.cp.horizon, cfg.model.cp.rank) == (4, 8)
    initialize_parallel(1, 1, 1, seed=0)  # the whole model in one process: every count is global
    with torch.device("meta"):
        model = CPModel(cfg.model)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    trunk = sum(p.numel() for p in model.trunk.parameters())
    head = sum(p.numel() for p in model.head.parameters())
    assert trunk == trunk_formula(cfg.model)
    assert head == head_formula(cfg.model)
    if PUBLISHED[name] is not None:
        count, precision = PUBLISHED[name]
        assert abs(trunk - count) <= precision, (name, trunk)
    print(f"{name}: trunk {trunk:,}, head {head:,}")
