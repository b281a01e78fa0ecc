"""The whole model (Megatron trunk + CP head) in one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpmtp_dist.config import CPHeadConfig, ModelConfig, TrunkConfig
from cpmtp_dist.data.loader import make_targets
from cpmtp_dist.model.cp_head import IGNORE_INDEX
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.parallel.state import initialize_parallel

V = 64


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(1, 1, 1, seed=0)


def make_model(n: int, r: int, **cp) -> CPModel:
    torch.manual_seed(0)
    trunk = TrunkConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=V)
    return CPModel(ModelConfig(trunk=trunk, cp=CPHeadConfig(horizon=n, rank=r, **cp)))


def test_n1_r1_is_the_plain_lm_loss_of_the_same_trunk():
    model = make_model(1, 1)  # residual phi, W2 = 0: the head is exactly the tied unembedding
    batch = torch.randint(0, V, (3, 17))
    tokens, targets = make_targets(batch, 1)
    pos = torch.arange(16).expand(3, 16)
    lm_loss = model.trunk(tokens, pos, attention_mask=None, labels=batch[:, 1:])  # megatron's own [B, T]
    for impl in ("chunked", "naive"):
        model.cfg.cp.loss_impl = impl
        out = model(tokens, targets)
        torch.testing.assert_close(out.loss_sum, lm_loss.sum())
        assert int(out.num_positions) == 3 * 16


def test_next_token_distribution_of_n1_r1_is_the_trunk_softmax():
    model = make_model(1, 1)
    tokens = torch.randint(0, V, (2, 9))
    logits = model.trunk(tokens, torch.arange(9).expand(2, 9), attention_mask=None)  # [B, T, V]
    torch.testing.assert_close(model.next_token_log_probs(tokens), F.log_softmax(logits[:, -1], -1))


@pytest.mark.parametrize("cp", [{"phi": "residual"}, {"phi": "linear"}, {"parameterisation": "separate"}])
def test_chunked_equals_naive_through_the_trunk_in_float64(cp):
    batch = torch.randint(0, V, (2, 17))
    tokens, targets = make_targets(batch, 3)  # the last positions lose their far targets
    targets[1, 4, 0] = IGNORE_INDEX
    grads, values = {}, {}
    for impl in ("naive", "chunked"):
        model = make_model(3, 4, chunk_tokens=7, loss_impl=impl, **cp).double()  # same seed, same weights
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # W2 = 0 at init would hide bugs in the phi gradients
            for p in model.head.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
        out = model(tokens, targets)
        out.loss_sum.backward()
        values[impl] = out.loss_sum.detach()
        grads[impl] = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(values["chunked"], values["naive"], rtol=0, atol=1e-9)
    assert grads["chunked"].keys() == grads["naive"].keys()
    trunk_keys = [k for k in grads["naive"] if k.startswith("trunk.")]
    assert "trunk.embedding.word_embeddings.weight" in trunk_keys and len(trunk_keys) > 5
    for k, g in grads["naive"].items():
        torch.testing.assert_close(grads["chunked"][k], g, rtol=0, atol=1e-6, msg=k)


def test_aux_loss_is_attached_and_differentiable():
    model = make_model(2, 3, aux_loss_weight=0.1)
    tokens, targets = make_targets(torch.randint(0, V, (2, 17)), 2)
    out = model(tokens, targets)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    out.aux_loss.backward()
    assert model.head.gate.weight.grad.abs().sum() > 0
