"""FLOPs per token (MFU's model FLOPs, HFU's hardware FLOPs) against the matmuls a real training step runs,
and the GPU peaks behind MFU."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cpmtp_dist.config import CPHeadConfig, ModelConfig, TrunkConfig
from cpmtp_dist.data.loader import make_targets
from cpmtp_dist.flops import flops_per_token, forward_flops_per_token
from cpmtp_dist.model.cp_head import IGNORE_INDEX
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.parallel.state import initialize_parallel
from cpmtp_dist.training.metrics import gpu_peak_flops, peak_flops

aten = torch.ops.aten
HEADS = {
    "shared residual": {},
    "shared linear": {"phi": "linear"},
    "separate": {"parameterisation": "separate"},
}


class MatmulFlops(TorchDispatchMode):
    """Counts 2·m·k·n for every matrix product that runs (mm, addmm, bmm, baddbmm: what linear layers, the local
    attention's scores and values and einsums lower to; addmm_: the chunked loss's gradient accumulation),
    forward and backward alike. The CPU's fused attention
    kernel is charged as the matrix products it stands for: q kᵀ and p v forward (2 · 2·b·h·sq·sk·d), twice that
    backward (dv, dp, dq, dk), the convention of torch's own flop counter."""

    SDPA = (
        aten._scaled_dot_product_flash_attention_for_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward,
    )

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.fused = 0  # fused attention calls seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in (aten.mm, aten.bmm, aten.addmm, aten.addmm_, aten.baddbmm):
            a, b = args[-2:] if packet in (aten.mm, aten.bmm) else args[1:3]
            self.total += 2 * math.prod(a.shape) * b.shape[-1]
        elif packet in self.SDPA:
            q, k = (
                (args[0], args[1]) if packet == self.SDPA[0] else (args[1], args[2])
            )  # backward: grad_out first
            matmuls = 2 if packet == self.SDPA[0] else 4
            self.fused += 1
            self.total += matmuls * 2 * math.prod(q.shape) * k.shape[-2]  # q: (b, h, sq, d), k: (b, h, sk, d)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("impl", ["naive", "chunked"])
@pytest.mark.parametrize("freeze_trunk", [False, True])
@pytest.mark.parametrize("attention", ["local", "sdpa"])
def test_flops_per_token_are_the_matmuls_of_a_training_step(head, impl, freeze_trunk, attention):
    check_flops(head, impl, freeze_trunk, attention)


@pytest.mark.parametrize("freeze_trunk", [False, True])
def test_flops_follow_grouped_query_attention_and_the_gated_mlp(freeze_trunk):
    """A Llama-style trunk: 2 key/value groups for 4 heads, SwiGLU, untied output layer."""
    check_flops("shared residual", "chunked", freeze_trunk, "sdpa", num_query_groups=2, mlp="swiglu",
                untie_embeddings=True)  # fmt: skip


def check_flops(head: str, impl: str, freeze_trunk: bool, attention: str, **trunk_options) -> None:
    initialize_parallel(1, 1, 1, seed=0)
    batch, seq = 2, 16
    trunk = TrunkConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=seq, vocab_size=64,
                        ffn_hidden_size=48, attention=attention, **trunk_options)  # fmt: skip
    cfg = ModelConfig(trunk=trunk, cp=CPHeadConfig(horizon=3, rank=2, loss_impl=impl, **HEADS[head]))
    model = CPModel(cfg)
    if freeze_trunk:  # as finetune.freeze_trunk does: the trunk, its tied unembedding included
        model.trunk.requires_grad_(False)
    tokens, targets = make_targets(torch.randint(0, 64, (batch, seq + 1)), 3, IGNORE_INDEX)
    with MatmulFlops() as counted:
        model(tokens, targets).loss_sum.backward()
    flops = flops_per_token(cfg, freeze_trunk=freeze_trunk)
    assert counted.total / (batch * seq) == flops.hardware
    assert counted.fused == (
        0 if attention == "local" else (2 if freeze_trunk else 4)
    )  # 2 layers, fwd (+ bwd)
    # Model FLOPs leave out the chunked loss's recomputation of the head's forward, only that.
    recompute = flops.hardware - flops.model
    assert recompute == (forward_flops_per_token(cfg)[1] if impl == "chunked" else 0)


def test_gpu_peaks_by_name_and_the_configured_peak(monkeypatch):
    names = {
        "NVIDIA H100 80GB HBM3": 989e12,  # SXM
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H100 NVL": 835e12,
        "NVIDIA H200": 989e12,
        "NVIDIA H200 NVL": 835e12,
        "NVIDIA GH200 480GB": 989e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12,
        "NVIDIA B200": 2250e12,
        "NVIDIA A10": 125e12,
        "NVIDIA GeForce RTX 4090": None,
    }
    assert {name: gpu_peak_flops(name) for name in names} == names
    assert peak_flops(torch.device("cpu")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Mystery X1")
    gpu = torch.device("cuda", 0)
    with pytest.warns(
        UserWarning, match=r"no bf16 peak known for the GPU 'NVIDIA Mystery X1'.*train.peak_tflops"
    ):
        assert peak_flops(gpu) is None
    assert peak_flops(gpu, peak_tflops=500.0) == 500e12  # the configured peak, no warning
