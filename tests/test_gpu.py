"""The GPU path on one CUDA device: training, the core attentions, the chunked CP loss, decoding, collectives.

Marked `gpu`: they run only with `CPMTP_TEST_GPU=1` on a machine with CUDA (`bench/gpu_check.sh` runs them
as `pytest -m gpu`) and skip elsewhere (tests/conftest.py). Each takes seconds. The references are the CPU
suite's: what these add is that the same code holds on CUDA, where the kernels (flash / memory-efficient
attention, cuBLAS, NCCL) and the device rules differ. In fp32 and fp64 the GPU must agree with the
reference to within rounding; bf16 runs are checked for sanity (finite, learning, on the device).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from cpmtp_dist.config import CPHeadConfig, TrunkConfig
from cpmtp_dist.config_io import load_config
from cpmtp_dist.inference.decoding import Decoder
from cpmtp_dist.inference.sampling import Sampling
from cpmtp_dist.model.cp_head import IGNORE_INDEX, CPHead
from cpmtp_dist.model.cp_loss import chunked_cp_loss, naive_cp_loss
from cpmtp_dist.model.trunk import build_trunk, init_trunk_weights, trunk_hidden
from cpmtp_dist.parallel import collectives
from cpmtp_dist.parallel.collectives import all_gather, all_reduce_, backend_device
from cpmtp_dist.parallel.pipeline import PipelineStage
from cpmtp_dist.parallel.state import initialize_parallel
from cpmtp_dist.training import trainer
from parity_config import PARITY
from test_decoding import make_model

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    initialize_parallel(1, 1, 1, seed=0)  # NCCL, one process
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 matmuls in full precision (no TF32), whatever an import or an earlier test set: the fp32
    comparisons below are to rounding."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def test_training_steps_in_bf16_zero2(tmp_path, monkeypatch):
    """One process trains through `train()` on the GPU, bf16 with ZeRO-2 (as bench/gpu_check.sh's 1B run):
    a finite loss that goes down, the metrics a GPU run adds (MFU, peak memory), the weights and the Adam
    moments on the GPU. First in the file: `train()` brings up CUDA and NCCL itself, after
    forking its checkpoint writer, as a `cpmtp train` process does."""
    monkeypatch.setenv("CPMTP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(ROOT)
    engines = []
    build = trainer.build_engine
    monkeypatch.setattr(
        trainer, "build_engine", lambda *a, **k: engines.append(build(*a, **k)) or engines[-1]
    )
    cfg = load_config(
        "configs/tiny.yaml",
        [
            *PARITY,
            "train.steps=8",
            "train.micro_batch_size=4",
            "train.precision=bf16",
            "train.peak_tflops=100",  # MFU logged whatever the GPU's name
            "train.eval_batches=1",
            "optim.zero_stage=2",
            "optim.warmup_steps=2",
            "optim.lr=3e-3",
            "tracking.enabled=false",
        ],
    )
    result = trainer.train(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 8 and all(x is not None for x in losses), losses
    assert losses[-1] < losses[0] - 0.3, losses  # 18.1 -> 17.3 in a CPU run of these settings
    last = [r for r in rows if "loss" in r][-1]
    assert 0 < last["mfu"] < 1 and last["max_memory_gb"] > 0 and last["tokens_per_s"] > 0, last
    (engine,) = engines
    cuda = torch.device("cuda", torch.cuda.current_device())
    assert all(p.device == cuda and p.dtype == torch.bfloat16 for p in engine.module.parameters())
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    moments = [v for st in base.state.values() for v in st.values() if torch.is_tensor(v) and v.dim() > 0]
    assert moments and all(v.device == cuda for v in moments)
    assert result.checkpoint is not None and (result.checkpoint / "meta.json").exists()


def _trunks(dtype: torch.dtype, device: torch.device) -> dict[str, torch.nn.Module]:
    cfg = TrunkConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64, vocab_size=128)
    trunks = {}
    for kind in ("local", "sdpa"):
        c = TrunkConfig(**{**cfg.__dict__, "attention": kind})
        trunks[kind] = build_trunk(c)
        init_trunk_weights(trunks[kind], c, seed=3, stage=PipelineStage())
        trunks[kind] = trunks[kind].to(device=device, dtype=dtype)
    return trunks


def test_sdpa_attention_equals_local(cuda):
    """The CUDA kernels behind `sdpa` against Megatron's local attention: fp32 hidden states and every weight
    gradient to rounding; in bf16 (where the flash kernels run) both stay close to the fp32 result."""
    tokens = torch.randint(0, 128, (3, 64), generator=torch.Generator().manual_seed(0)).to(cuda)
    trunks = _trunks(torch.float32, cuda)
    out = {k: trunk_hidden(m, tokens) for k, m in trunks.items()}
    assert out["sdpa"].device == cuda
    torch.testing.assert_close(out["sdpa"], out["local"], atol=1e-4, rtol=1e-4)
    for k in trunks:
        weights = torch.linspace(-1, 1, out[k].numel(), device=cuda).view_as(out[k])
        (out[k] * weights).sum().backward()
    for (name, p), q in zip(trunks["sdpa"].named_parameters(), trunks["local"].parameters(), strict=True):
        scale = float(q.grad.abs().max())
        assert scale > 0 and float((p.grad - q.grad).abs().max()) <= 1e-4 * scale, (name, scale)
    with torch.no_grad():
        for kind, m in _trunks(torch.bfloat16, cuda).items():
            h = trunk_hidden(m, tokens)
            assert h.dtype == torch.bfloat16, kind
            torch.testing.assert_close(h.float(), out["local"].detach(), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 2e-3)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kind", [("shared", "residual"), ("shared", "linear"), ("separate", "residual")])
def test_chunked_cp_loss_equals_naive(cuda, dtype, atol, kind):
    """Values and gradients of the chunked loss (several chunks) against the naive one, n = 4, r = 8."""
    d, v, n, r = 32, 500, 4, 8
    torch.manual_seed(0)
    cfg = CPHeadConfig(horizon=n, rank=r, parameterisation=kind[0], phi=kind[1], init_noise_std=0.5)
    head = CPHead(d, v, cfg, params_dtype=dtype).to(cuda)
    with torch.no_grad():  # away from the symmetric init: every parameter matters
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    unembed = (torch.randn(v, d, dtype=dtype, device=cuda) * 0.5).requires_grad_(kind[0] == "shared")
    x = torch.randn(2, 48, d, dtype=dtype, device=cuda, requires_grad=True)  # (B, T, d)
    targets = torch.randint(0, v, (2, 48, n), device=cuda)
    targets[:, -3:, 1:] = IGNORE_INDEX  # past the end of the sequence
    grads = {}
    for name, impl, kw in (("naive", naive_cp_loss, {}), ("chunked", chunked_cp_loss, {"chunk_tokens": 20})):
        leaves = [x, *head.parameters()] + ([unembed] if unembed.requires_grad else [])
        for t in leaves:
            t.grad = None
        out = impl(head, torch.tanh(x), targets, unembed if kind[0] == "shared" else None, **kw)
        out.loss_sum.backward()
        assert out.loss_sum.device == cuda
        grads[name] = (out.loss_sum.detach(), [t.grad.clone() for t in leaves])
    (ref, ref_grads), (got, got_grads) = grads["naive"], grads["chunked"]
    torch.testing.assert_close(got, ref, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=atol)
    for g, gr in zip(got_grads, ref_grads, strict=True):
        assert gr.abs().max() > 0
        torch.testing.assert_close(g, gr, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=atol)


def test_greedy_speculative_equals_autoregressive_and_bf16_decodes(cuda):
    """fp32 on the GPU: greedy speculative decoding gives the autoregressive tokens, past a window refill.
    bf16: both modes and sampling (a CUDA generator) run and give tokens of the vocabulary."""
    model = make_model(4, 4, seq=24, sharpen=4.0, head_noise=0.3).to(cuda)
    dec = Decoder(model)
    assert dec.device == cuda
    for prompt in ([3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3]):
        ar, spec = dec.generate(prompt, 40, mode="ar"), dec.generate(prompt, 40, mode="speculative")
        assert spec.tokens == ar.tokens and len(ar.tokens) == 40
        assert spec.stats.forwards <= ar.stats.forwards
    bf16 = Decoder(model.to(torch.bfloat16))
    sampling = Sampling(greedy=False, temperature=0.8, top_k=20, top_p=0.95)
    for mode in ("ar", "speculative"):
        for s in (None, sampling):
            out = bf16.generate([3, 1, 4, 1, 5], 30, mode=mode, sampling=s, seed=1)
            assert len(out.tokens) == 30 and all(0 <= t < 64 for t in out.tokens), (mode, s)


def test_collectives_run_on_the_current_device(cuda, monkeypatch):
    """Under NCCL a CPU tensor is reduced on the current GPU and the result comes back in place."""
    assert dist.get_backend() == "nccl" and backend_device() == cuda
    seen = []
    reduce = dist.all_reduce
    monkeypatch.setattr(
        collectives.dist, "all_reduce", lambda t, **kw: seen.append(t.device) or reduce(t, **kw)
    )
    host = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert all_reduce_(host) is host and host.tolist() == [1.0, 2.0] and seen == [cuda]
    on_gpu = torch.ones(3, device=cuda)
    assert all_reduce_(on_gpu) is on_gpu and seen[-1] == cuda
    (gathered,) = all_gather(host, 1)
    assert gathered.device.type == "cpu" and gathered.tolist() == [1.0, 2.0]
