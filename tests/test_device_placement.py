"""Device mix-ups, caught on a machine without a GPU: PyTorch's `meta` device plays the GPU.

A meta tensor follows the device rules of a CUDA tensor — an op that meets a CPU tensor (other than a 0-dim
scalar) raises "Tensor on device cpu is not on the expected device meta!" — and computes nothing, so a
training or decoding step of a model on `meta` fails exactly where a GPU run would meet a tensor made on the
CPU. Megatron's own placements (rotary table, causal masks, KV cache: the current CUDA device on a GPU
machine) go where the compatibility layer puts them (`megatron_compat._CPU`), here redirected to `meta`.

Covered: the model's forward, the chunked CP loss forward and backward, the trainer's step statistics; the KV
cache's prefill and extension, the verifier's next-token distributions, the draft factors of the requested
head positions, the drafting chain (greedy and sampled), the sampling transform, a greedy tree draft, the
tree's forward (tree mask and positions) and keeping its path in the cache; the decoder itself up to its
first read of a value (it must fail there, not on a device). Not covered: code that reads values back to the
host (`.item()`, `int()`, control flow on values: the rest of `Decoder.generate`, `StatSums.reduce`),
generators (meta has none; sampling draws here without one), DeepSpeed's engine, collectives (their device is
`parallel/collectives.py`'s job, tested in `tests/test_collectives.py`), and CUDA kernels themselves.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree
from megatron.core import parallel_state
from megatron.core.utils import GlobalMemoryBuffer
from torch.utils._python_dispatch import TorchDispatchMode

from cpmtp_dist.config import CPHeadConfig, ModelConfig, TrunkConfig
from cpmtp_dist.data.loader import make_targets
from cpmtp_dist.inference.decoding import Decoder
from cpmtp_dist.inference.kv_cache import KVCache
from cpmtp_dist.inference.sampling import Sampling
from cpmtp_dist.model.cp_head import IGNORE_INDEX
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.model.drafting import draft_from_factors, first_token_factors, greedy_tree
from cpmtp_dist.parallel import megatron_compat
from cpmtp_dist.parallel.state import initialize_parallel
from cpmtp_dist.training.trainer import StatSums

GPU = torch.device("meta")
N, R, V = 3, 2, 64
HEADS = {
    "shared residual": {},
    "shared linear": {"phi": "linear"},
    "separate": {"parameterisation": "separate"},
}


class StrictDevices(TorchDispatchMode):
    """Meta lets an op take CPU index tensors (`embedding`, `index_select`, `gather`) where CUDA refuses them:
    this mode refuses any CPU tensor with dimensions among the inputs of an op that also takes a meta tensor,
    as CUDA does (0-dim CPU scalars pass, as on CUDA; copies between devices are what `.to()` is for)."""

    MOVES = ("aten::_to_copy", "aten::copy_", "aten::_copy_from", "aten::_copy_from_and_resize")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func._schema.name not in self.MOVES and any(t.device == GPU for t in tensors):
            cpu = [tuple(t.shape) for t in tensors if t.device.type == "cpu" and t.dim() > 0]
            if cpu:
                raise RuntimeError(
                    f"device mix-up: {func._schema.name} takes CPU tensors {cpu} with GPU ones"
                )
        return func(*args, **kwargs)


@pytest.fixture
def on_gpu(monkeypatch):
    initialize_parallel(1, 1, 1, seed=0)
    monkeypatch.setattr(megatron_compat, "_CPU", GPU)  # Megatron's "current CUDA device"
    # Megatron keeps one process-wide scratch buffer (the local attention's scores): earlier tests of this
    # process made it on the CPU. A GPU process makes it on its GPU; so does this fresh one.
    monkeypatch.setattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", GlobalMemoryBuffer())
    with StrictDevices():
        yield


def gpu_model(attention: str, **cp) -> CPModel:
    trunk = TrunkConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=V, attention=attention
    )
    return CPModel(ModelConfig(trunk=trunk, cp=CPHeadConfig(horizon=N, rank=R, **cp))).to(GPU)


@pytest.mark.parametrize("attention", ["sdpa", "local"])
@pytest.mark.parametrize("head", list(HEADS))
def test_a_training_step_meets_no_cpu_tensor(on_gpu, head, attention):
    model = gpu_model(attention, **HEADS[head])
    tokens, targets = make_targets(torch.randint(0, V, (2, 17)).to(GPU), N, IGNORE_INDEX)
    sums = StatSums(N, R, GPU)
    out = model(tokens, targets, with_accuracy=True)
    sums.add(out, torch.zeros((), device=GPU))
    out.loss_sum.backward()
    assert out.loss_sum.device == GPU
    assert all(p.grad is not None and p.grad.device == GPU for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("attention", ["sdpa", "local"])
@pytest.mark.parametrize("head", list(HEADS))
def test_a_decoding_step_meets_no_cpu_tensor(on_gpu, head, attention):
    model = gpu_model(attention, **HEADS[head]).eval()
    u = model.unembedding()
    sampling = Sampling(greedy=False, temperature=0.8, top_k=10, top_p=0.9)
    with torch.inference_mode():
        cache = KVCache(model.trunk, 16)
        h = cache.extend(torch.tensor([5, 6, 7], device=GPU))[-1:]  # the prompt's prefill
        log_w, first, marginal = first_token_factors(model.head, h, u)
        log_p = torch.cat([first.unsqueeze(2), model.head.factor_log_probs(h, u, slice(1, N))], dim=2)
        for greedy in (True, False):
            d = draft_from_factors(
                log_w, log_p, greedy=greedy, transform=None if greedy else sampling.transform
            )
            hs = cache.extend(d.tokens[0])  # the verifying forward over the step's tokens
            verifier = first_token_factors(model.head, hs, u)[2]
            assert d.tokens.device == verifier.device == sampling.transform(verifier).device == GPU
            cache.rollback(3)
        # A tree step as the decoder takes it: its head at h, a greedy tree of 2 branches, the tree's forward
        # (tree mask, tree positions), the head at the tree's tokens, keeping one path in the cache.
        gate, first, _ = Decoder(model)._head(h, greedy=True)
        pi = gate[0] * first[0, :, 5]
        rest = torch.softmax(model.head.factor_logits_at(h, u, slice(1, N))[0], dim=-1)
        chains = greedy_tree(pi / pi.sum(), rest, 2)  # (2, N - 1)
        tree = torch.cat([torch.tensor([5], device=GPU), chains.flatten()])
        hs = cache.extend(tree, [-1, 0, 1, 0, 3])
        assert all(x.device == GPU for x in Decoder(model)._head(hs, greedy=False))
        cache.keep(3, [3, 6, 7])
        # The decoder itself runs into its first read of a value, not into a device mix-up.
        for mode in ("ar", "speculative", "tree"):
            with pytest.raises(RuntimeError, match="(cannot be called on|Cannot copy out of) meta tensor"):
                Decoder(model).generate([5, 6, 7], 4, mode=mode)
