"""The Megatron-core trunk on CPU in one process: shapes, causality, parity with GPTModel, determinism, compat."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from megatron.core import package_info, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel import random as mrandom

from cpmtp_dist.config import TrunkConfig
from cpmtp_dist.model.trunk import (
    build_trunk,
    global_param_name,
    init_trunk_weights,
    trunk_hidden,
    unembedding_weight,
)
from cpmtp_dist.parallel.megatron_compat import maybe_apply_cpu_compat
from cpmtp_dist.parallel.pipeline import PipelineStage
from cpmtp_dist.parallel.state import ParallelGroups, destroy_parallel, initialize_parallel

ROOT = Path(__file__).resolve().parents[1]
CFG = TrunkConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=128)
B, T = 3, CFG.seq_length
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU compat layer is inactive with CUDA")


@pytest.fixture(scope="session")
def groups() -> ParallelGroups:
    groups = initialize_parallel(seed=0)
    yield groups
    destroy_parallel()


@pytest.fixture
def model(groups: ParallelGroups):
    initialize_parallel(seed=1234)  # re-seeds: every test sees the same weights
    return build_trunk(CFG).eval()


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def positions() -> torch.Tensor:
    return torch.arange(T).unsqueeze(0).expand(B, T)


def test_single_process_groups(groups: ParallelGroups) -> None:
    assert (groups.world_size, groups.rank) == (1, 0)
    assert groups.sizes == (1, 1, 1) and groups.dp_size == 1 and groups.expert_dp_size == 1
    assert groups.is_first_stage and groups.is_last_stage
    assert initialize_parallel(seed=3) is groups  # idempotent: same sizes -> the same object


def test_global_param_name_of_pipeline_stages() -> None:
    last = PipelineStage(rank=1, size=2)
    assert (
        global_param_name("decoder.layers.0.mlp.linear_fc1.weight", last, 4)
        == "decoder.layers.2.mlp.linear_fc1.weight"
    )
    assert (
        global_param_name("decoder.layers.1.input_layernorm.weight", last, 4)
        == "decoder.layers.3.input_layernorm.weight"
    )
    assert global_param_name("output_layer.weight", last, 4) == "embedding.word_embeddings.weight"
    assert global_param_name("decoder.final_layernorm.weight", last, 4) == "decoder.final_layernorm.weight"
    first = PipelineStage(rank=0, size=2)
    assert (
        global_param_name("decoder.layers.1.mlp.linear_fc2.weight", first, 4)
        == "decoder.layers.1.mlp.linear_fc2.weight"
    )


def test_init_trunk_weights_depend_on_seed_and_name_only(groups: ParallelGroups) -> None:
    def weights(generator_seed: int, seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(generator_seed)  # the construction's own draws must not matter
        model = build_trunk(CFG)
        init_trunk_weights(model, CFG, seed, PipelineStage())
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    a, b, c = weights(1, seed=5), weights(2, seed=5), weights(1, seed=6)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(
        a["decoder.layers.0.mlp.linear_fc1.weight"], c["decoder.layers.0.mlp.linear_fc1.weight"]
    )
    # Layers differ from each other; the output projections use megatron's std / sqrt(2 L).
    assert not torch.equal(
        a["decoder.layers.0.mlp.linear_fc1.weight"], a["decoder.layers.1.mlp.linear_fc1.weight"]
    )
    std_in = a["decoder.layers.0.mlp.linear_fc1.weight"].std().item()
    std_out = a["decoder.layers.0.mlp.linear_fc2.weight"].std().item()
    assert std_in == pytest.approx(CFG.init_method_std, rel=0.05)
    assert std_out == pytest.approx(CFG.init_method_std / (2 * CFG.num_layers) ** 0.5, rel=0.05)
    assert torch.equal(a["decoder.final_layernorm.weight"], torch.ones(CFG.hidden_size))


@torch.no_grad()
def test_trunk_hidden_shape(model) -> None:
    h = trunk_hidden(model, tokens())
    assert h.shape == (B, T, CFG.hidden_size) and h.dtype == torch.float32
    assert torch.isfinite(h).all()
    # The final norm was applied: with RMSNorm's unit init each row has mean square ms / (ms + eps) ~ 1,
    # a few % below 1 because the residual stream is small at init (ms ~ 4e-4 vs eps = 1e-5); without the
    # norm the mean square would be ~4e-4.
    torch.testing.assert_close(h.pow(2).mean(-1), torch.ones(B, T), atol=0.05, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("k", [0, 5, T - 1])
def test_causality(model, k: int) -> None:
    tok = tokens()
    changed = tok.clone()
    changed[:, k] = (changed[:, k] + 1) % CFG.vocab_size
    h, h2 = trunk_hidden(model, tok), trunk_hidden(model, changed)
    # The past is untouched bit for bit (masked scores are exactly 0 after the softmax) ...
    torch.testing.assert_close(h2[:, :k], h[:, :k], rtol=0, atol=0)
    # ... and every position from k on sees the change (so attention does mix across positions).
    diff = (h2[:, k:] - h[:, k:]).abs().amax(dim=-1)  # (B, T - k)
    assert (diff > 1e-4).all()


@torch.no_grad()
def test_tied_unembedding(model) -> None:
    w = unembedding_weight(model)
    assert w.shape == (CFG.vocab_size, CFG.hidden_size)
    assert w is model.embedding.word_embeddings.weight
    assert model.output_layer.weight is None  # the output layer owns no weight of its own


@torch.no_grad()
def test_logits_match_gptmodel_forward(model) -> None:
    tok = tokens(1)
    ref = model(tok, positions(), attention_mask=None)
    assert ref.shape == (B, T, CFG.vocab_size)  # megatron transposes its [T, B, V] logits to batch-first
    logits = trunk_hidden(model, tok) @ unembedding_weight(model).t()
    torch.testing.assert_close(logits, ref)


@torch.no_grad()
def test_per_token_loss_matches_gptmodel(model) -> None:
    tok, labels = tokens(2), tokens(3)
    ref = model(tok, positions(), attention_mask=None, labels=labels)
    assert ref.shape == (B, T)  # per-token loss, batch-first
    logits = trunk_hidden(model, tok) @ unembedding_weight(model).t()
    ce = F.cross_entropy(logits.reshape(-1, CFG.vocab_size), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(ce.view(B, T), ref)


def test_same_seed_same_weights(groups: ParallelGroups) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        initialize_parallel(seed=seed)
        return {name: p.detach().clone() for name, p in build_trunk(CFG).named_parameters()}

    a, b, c = weights(7), weights(7), weights(8)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["embedding.word_embeddings.weight"], c["embedding.word_embeddings.weight"])


@torch.no_grad()
def test_bf16_trunk_tracks_fp32(groups: ParallelGroups) -> None:
    initialize_parallel(seed=11)
    fp32 = build_trunk(CFG).eval()
    initialize_parallel(seed=11)
    bf16 = build_trunk(CFG, params_dtype=torch.bfloat16).eval()
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    h32, h16 = trunk_hidden(fp32, tokens()), trunk_hidden(bf16, tokens())
    assert h16.dtype == torch.bfloat16
    torch.testing.assert_close(h16.float(), h32, atol=0.1, rtol=0.05)


def test_rng_tracker_fork_on_cpu(groups: ParallelGroups) -> None:
    """Forking the model-parallel stream uses its own CPU state and leaves the default generator alone."""
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def draws() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        initialize_parallel(seed=5)
        before = torch.get_rng_state()
        with tracker.fork():
            first = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), before)
        with tracker.fork():
            second = torch.rand(4)  # the forked stream advanced
        return first, second, torch.rand(4)

    first, second, default = draws()
    assert not torch.equal(first, second) and not torch.equal(first, default)
    for x, y in zip(draws(), (first, second, default), strict=True):
        assert torch.equal(x, y)


def test_dropout_training_step_runs(groups: ParallelGroups) -> None:
    """Dropout draws inside a forked RNG stream; a backward pass reaches the tied embedding."""
    initialize_parallel(seed=2)
    model = build_trunk(TrunkConfig(**{**vars(CFG), "dropout": 0.1})).train()
    h = trunk_hidden(model, tokens())
    (h @ unembedding_weight(model).t()).logsumexp(-1).mean().backward()
    assert unembedding_weight(model).grad is not None


def test_megatron_schedule_runs(model) -> None:
    """Megatron's no-pipelining schedule (total_num_tokens on "cuda" upstream) runs and matches a direct loss."""
    tok = tokens(4)

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        out = chunk(batch, None, attention_mask=None, labels=batch)  # [B, T] per-token loss
        return out, lambda loss: (loss.mean(), {"loss": loss.mean().detach()})

    out = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tok, tok]),
        model=[model],
        num_microbatches=2,
        seq_length=T,
        micro_batch_size=B,
        forward_only=True,
    )
    with torch.no_grad():
        direct = model(tok, positions(), attention_mask=None, labels=tok).mean()
    assert len(out) == 2
    torch.testing.assert_close(out[0]["loss"], direct)


@cpu_only
def test_compat_is_idempotent(groups: ParallelGroups) -> None:
    torch_stand_in, tracker_cls = mappings.torch, mrandom.CudaRNGStatesTracker
    seed_fn = tensor_parallel.model_parallel_cuda_manual_seed
    assert maybe_apply_cpu_compat() is True
    assert maybe_apply_cpu_compat() is True
    # Nothing was wrapped a second time.
    assert mappings.torch is torch_stand_in and mappings.torch is not torch
    assert mrandom.CudaRNGStatesTracker is tracker_cls
    assert tensor_parallel.model_parallel_cuda_manual_seed is seed_fn


@cpu_only
def test_compat_refuses_other_megatron_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(package_info, "__version__", "0.17.0")
    with pytest.raises(RuntimeError, match=r"megatron-core 0\.17\.0"):
        maybe_apply_cpu_compat()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_attention_equals_local(groups: ParallelGroups, dtype: torch.dtype) -> None:
    """model.trunk.attention: sdpa (torch's scaled_dot_product_attention) against Megatron's local
    DotProductAttention, same weights: hidden states and every weight gradient; the tolerance is fp32's."""
    trunks = {}
    for kind in ("local", "sdpa"):
        cfg = TrunkConfig(**{**CFG.__dict__, "attention": kind})
        trunks[kind] = build_trunk(cfg).to(dtype)
        init_trunk_weights(trunks[kind], cfg, seed=3, stage=PipelineStage())
    attn = trunks["sdpa"].decoder.layers[0].self_attention.core_attention
    assert type(attn).__name__ == "SDPAttention"
    x = tokens()
    out = {k: trunk_hidden(m, x) for k, m in trunks.items()}
    torch.testing.assert_close(out["sdpa"], out["local"], atol=1e-5, rtol=1e-5)
    for k in trunks:
        (out[k] * torch.linspace(-1, 1, out[k].numel(), dtype=dtype).view_as(out[k])).sum().backward()
    for (name, p), q in zip(trunks["sdpa"].named_parameters(), trunks["local"].parameters(), strict=True):
        # Summed over 48 positions: fp32 rounding of the two orders of summation, relative to the largest entry.
        scale = float(q.grad.abs().max())
        assert float((p.grad - q.grad).abs().max()) <= 1e-5 * scale, (name, scale)


def test_attention_benchmark_quick(groups: ParallelGroups, tmp_path) -> None:
    """bench/attention.py --quick, in this process: both kinds timed, the markdown section written."""
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "bench" / "attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    md = tmp_path / "BENCH.md"
    assert bench.main(["--quick", "--out", str(tmp_path / "a.json"), "--markdown", str(md)]) == 0
    (row,) = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert row["seq_len"] == 32 and row["local_s"] > 0 and row["sdpa_s"] > 0
    assert "| 32 |" in md.read_text() and "sdpa / local" in md.read_text()


def test_attention_choice_resolves_te_then_sdpa(groups: ParallelGroups, monkeypatch) -> None:
    """model.trunk.attention: `te` without Transformer Engine or CUDA is refused with the reason before anything
    is built; `auto` is te where it can run, else sdpa; the KV-cache decoder builds sdpa for te and auto."""
    from cpmtp_dist.model import attention

    why = attention.te_unavailable()
    assert why is not None  # no GPU here (and the gpu-marked tests cover CUDA)
    with pytest.raises(ValueError, match=r"model.trunk.attention='te' needs Transformer Engine.*set model"):
        build_trunk(TrunkConfig(**{**CFG.__dict__, "attention": "te"}))
    auto = build_trunk(TrunkConfig(**{**CFG.__dict__, "attention": "auto"}))
    assert type(auto.decoder.layers[0].self_attention.core_attention).__name__ == "SDPAttention"
    assert [attention.decoding_attention(k) for k in ("auto", "te", "sdpa", "local")] == ["sdpa"] * 3 + [
        "local"
    ]
    # Where Transformer Engine and CUDA are present: auto and te are Megatron's TE core attention.
    monkeypatch.setattr(attention, "te_unavailable", lambda: None)
    assert attention.resolve_attention("auto") == attention.resolve_attention("te") == "te"
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    assert attention.core_attention_module("te") is TEDotProductAttention
    assert (
        attention.resolve_attention("local") == "local" and attention.core_attention_module("local") is None
    )


def test_rope_scaling_follows_llama_3_1(groups: ParallelGroups) -> None:
    """model.trunk.rope_scaling_factor: the RoPE inverse frequencies against Llama 3.1's rule, written out here:
    wavelengths 2π/f above 8192 / 1 (the low-frequency bound) are divided by the factor, those below 8192 / 4
    kept, and those between interpolated with weight (8192 / wavelength − 1) / (4 − 1) on the kept value."""
    import math

    base, factor, dim = 500000, 32.0, CFG.hidden_size // CFG.num_attention_heads
    plain = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    wavelength = 2 * math.pi / plain
    smooth = ((8192 / wavelength - 1) / (4 - 1)).clamp(0, 1)
    expected = torch.where(
        wavelength > 8192,
        plain / factor,
        torch.where(wavelength < 2048, plain, (1 - smooth) * plain / factor + smooth * plain),
    )
    for scaling, want in ((0.0, plain), (factor, expected)):
        cfg = TrunkConfig(**{**CFG.__dict__, "rotary_base": base, "rope_scaling_factor": scaling})
        got = build_trunk(cfg).rotary_pos_emb.inv_freq
        torch.testing.assert_close(got.float(), want, rtol=1e-6, atol=0)
    assert not torch.allclose(expected, plain)  # the rule changes some frequencies at this head width
