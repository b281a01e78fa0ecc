"""`cpmtp eval`'s numbers on a hand-built model whose answers are known in closed form.

The final norm's weight is zero, so every hidden state is exactly 0 and every factor P_a^(s) is uniform
over V; the gate's bias fixes the mixture weights w. Then for a position with c targets the joint loss is
c log V, the next-token loss log V (perplexity V), every component explains the data equally (usage = w),
the argmax of a uniform distribution is token 0 (torch returns the first maximum), and every draft is
kept, greedy or sampled (draft and verifier are the same uniform distribution).
"""

from __future__ import annotations

import math

import pytest
import torch

from cpmtp_dist.config import CPHeadConfig, ModelConfig, TrunkConfig
from cpmtp_dist.inference.evaluation import evaluate_checkpoint
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.parallel.state import initialize_parallel

V, N, T = 64, 3, 16
W = [0.6, 0.3, 0.1]


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(1, 1, 1, seed=0)


def uniform_model() -> CPModel:
    trunk = TrunkConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=T, vocab_size=V)
    model = CPModel(ModelConfig(trunk=trunk, cp=CPHeadConfig(horizon=N, rank=len(W)))).eval()
    with torch.no_grad():
        model.trunk.decoder.final_layernorm.weight.zero_()
        model.head.gate.bias.copy_(torch.tensor(W).log())
    return model


def test_eval_metrics_of_a_uniform_model_with_known_gate():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(1, V, (4, T + 1), generator=g) for _ in range(3)]
    batches[0][0, 5] = 0  # target of head 1 at position 4, head 2 at 3, head 3 at 2
    batches[1][2, 16] = 0  # the last token: target of head 1 at 15, head 2 at 14, head 3 at 13
    batches[2][:, 1] = 0  # 4 targets of head 1 (position 0) only
    result = evaluate_checkpoint(uniform_model(), batches, prompts=3, new_tokens=1 + 2 * N)
    h = result["heldout"]

    targets_per_position = [min(N, T - t) for t in range(T)]  # targets past the end are missing
    joint = math.log(V) * sum(targets_per_position) / T
    assert h["joint_loss"] == pytest.approx(joint, rel=1e-6)
    assert h["ntp_loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert h["ntp_ppl"] == pytest.approx(V, rel=1e-5)
    for s in (1, 2, 3):
        assert h[f"head_loss_{s}"] == pytest.approx(math.log(V), rel=1e-6)
    rows = 12
    assert h["acc_head_1"] == pytest.approx(6 / (rows * T))
    # Head s has a target at positions t <= T - s: T - s + 1 of them per sequence.
    assert h["acc_head_2"] == pytest.approx(2 / (rows * (T - 1)))
    assert h["acc_head_3"] == pytest.approx(2 / (rows * (T - 2)))
    assert h["expert_usage"] == pytest.approx(W, abs=1e-5)
    assert h["gate_weight"] == pytest.approx(W, abs=1e-5)
    assert h["expert_usage_entropy"] == pytest.approx(-sum(w * math.log(w) for w in W), rel=1e-4)
    assert h["heldout_sequences"] == rows

    for kind in ("greedy", "sampling_t1"):
        d = result["decoding"][kind]
        assert d["sequences"] == 3 and d["new_tokens"] == 3 * (1 + 2 * N)
        assert d["forwards"] == 3 * 2  # 2 steps of N kept tokens, the last token without a forward
        assert d["tokens_per_forward"] == N
        assert d["acceptance"] == [1.0] * N
