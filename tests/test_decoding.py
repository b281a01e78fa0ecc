"""Decoding with the KV cache: rollback, greedy speculative = greedy autoregressive, and speculative
sampling has the distribution of plain sampling (docs/MODEL.md, "Self-speculative decoding").

References are independent of the decoder: a full forward over the whole context without any cache, and
the exact sampling distribution enumerated from the model's next-token distributions.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from scipy import stats

from cpmtp_dist.config import Config, CPHeadConfig, ModelConfig, TrunkConfig
from cpmtp_dist.inference import sampling as sampling_mod
from cpmtp_dist.inference.bench import bench_decode, first_difference
from cpmtp_dist.inference.decoding import Decoder
from cpmtp_dist.inference.generate import resolve_device
from cpmtp_dist.inference.kv_cache import KVCache
from cpmtp_dist.inference.sampling import Sampling, accept_or_resample, multi_draft_accept
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.model.drafting import draws_without_replacement
from cpmtp_dist.parallel.state import initialize_parallel
from cpmtp_dist.training.trainer import training_dtype


@pytest.fixture(scope="module", autouse=True)
def _parallel():
    initialize_parallel(1, 1, 1, seed=0)


def make_model(
    n: int,
    r: int,
    *,
    vocab: int = 64,
    seq: int = 32,
    layers: int = 2,
    sharpen: float = 1.0,
    head_noise: float = 0.0,
    attention: str = "auto",
    trunk_options: dict | None = None,
    **cp,
) -> CPModel:
    """A random model. `sharpen` scales the final norm (peakier next-token distributions, so that greedy
    decoding falls into the repetitions drafts can predict); `head_noise` makes the components differ."""
    torch.manual_seed(n * 100 + r)
    trunk = TrunkConfig(
        num_layers=layers,
        hidden_size=32,
        num_attention_heads=4,
        seq_length=seq,
        vocab_size=vocab,
        attention=attention,
        **(trunk_options or {}),
    )
    model = CPModel(ModelConfig(trunk=trunk, cp=CPHeadConfig(horizon=n, rank=r, **cp))).eval()
    with torch.no_grad():
        model.trunk.decoder.final_layernorm.weight.mul_(sharpen)
        head = model.head
        if head.parameterisation == "separate":  # start each U_a^(s) at the tied U, as a shared head does
            u = model.unembedding()
            head.unembed.copy_(
                u.expand_as(head.unembed) + torch.randn_like(head.unembed) * u.std() * head_noise
            )
        else:
            for p in head.parameters():
                p.add_(torch.randn_like(p) * head_noise)
    return model


def full_context_hidden(model: CPModel, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.hidden(torch.tensor([ids]))[0]


# ---------------------------------------------------------------------------------------------- KV cache
# Llama-style trunk: grouped-query attention (the cache holds 2 key/value heads for 4 query heads), SwiGLU,
# untied output layer.
LLAMA = {"num_query_groups": 2, "mlp": "swiglu", "untie_embeddings": True}


@pytest.mark.parametrize("trunk", [{}, LLAMA], ids=["gpt", "llama"])
def test_cached_forward_in_pieces_equals_one_full_forward(trunk):
    model = make_model(2, 2, trunk_options=trunk)
    ids = torch.randint(0, 64, (30,), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.trunk, 32)
    with torch.no_grad():
        pieces = [cache.extend(ids[a:b]) for a, b in [(0, 7), (7, 8), (8, 12), (12, 13), (13, 30)]]
    torch.testing.assert_close(torch.cat(pieces), full_context_hidden(model, ids.tolist()), atol=1e-5, rtol=0)
    assert cache.length == 30


def test_rollback_forgets_the_rejected_positions():
    model = make_model(2, 2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (18,), generator=g)
    junk = torch.randint(0, 64, (5,), generator=g)
    cache = KVCache(model.trunk, 32)
    with torch.no_grad():
        cache.extend(ids[:10])
        cache.extend(junk)  # a draft rejected whole
        cache.rollback(10)
        first = cache.extend(ids[10:15])
        cache.extend(junk[:3])  # a draft whose first token is kept
        cache.rollback(16)
        second = cache.extend(ids[16:18])
    ref = full_context_hidden(model, ids[:15].tolist() + junk[:1].tolist() + ids[16:18].tolist())
    torch.testing.assert_close(first, ref[10:15], atol=1e-5, rtol=0)
    torch.testing.assert_close(second, ref[16:18], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="cannot roll"):
        cache.rollback(cache.length + 1)
    with pytest.raises(ValueError, match="do not fit"):
        cache.extend(torch.zeros(32 - cache.length + 1, dtype=torch.long))


@pytest.mark.parametrize("attention", ["sdpa", "local"])
def test_a_tree_forward_equals_a_forward_of_each_path_and_keep_moves_a_path(attention):
    """Tree decoding's trunk call: 7 tokens after a 10-token prefix as a tree (root; branch 1-2; branch
    3-4-5; leaf 6): each token's hidden state is that of a plain forward over the prefix and its path. Keeping
    the path 0-3-4 then decodes on as if only that path had been written."""
    model = make_model(2, 2, attention=attention, trunk_options=LLAMA)
    g = torch.Generator().manual_seed(3)
    prefix, tree = torch.randint(0, 64, (10,), generator=g), torch.randint(0, 64, (7,), generator=g)
    parents = [-1, 0, 1, 0, 3, 4, 0]
    cache = KVCache(model.trunk, 32)
    with torch.no_grad():
        cache.extend(prefix)
        hs = cache.extend(tree, parents)
        for node in range(7):
            path = [node]
            while parents[path[0]] >= 0:
                path.insert(0, parents[path[0]])
            ref = full_context_hidden(model, prefix.tolist() + tree[path].tolist())[-1]
            torch.testing.assert_close(hs[node], ref, atol=1e-5, rtol=0, msg=f"node {node}")
        cache.keep(10, [10, 13, 14])
        assert cache.length == 13
        after = cache.extend(tree[5:7])
    ref = full_context_hidden(model, prefix.tolist() + tree[[0, 3, 4, 5, 6]].tolist())[-2:]
    torch.testing.assert_close(after, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="parents must come first"):
        cache.extend(tree[:2], [-1, 1])


# ------------------------------------------------------------------------------------ greedy equality
HEADS = {  # the head's config and how far its components are moved from the base model's
    "residual": ({"phi": "residual"}, 0.3),
    "linear": ({"phi": "linear"}, 0.3),
    "separate": ({"parameterisation": "separate"}, 2.0),
}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("n,r", [(2, 1), (3, 2), (4, 4)])
def test_greedy_speculative_output_is_the_greedy_autoregressive_output(n, r, head):
    """Speculative and tree decoding: several prompts, outputs longer than the 24-position window (so the
    window refills too), a mix of kept and rejected drafts. The autoregressive output itself is checked against decoding without
    any cache (one full forward per token) inside the first window."""
    cp, noise = HEADS[head]
    model = make_model(n, r, seq=24, sharpen=4.0, head_noise=noise, **cp)
    dec = Decoder(model)
    g = torch.Generator().manual_seed(n + r)
    tested = passed = later_branches = 0
    for length in (1, 3, 5, 11, 17, 30):
        prompt = torch.randint(0, 64, (length,), generator=g).tolist()
        ar = dec.generate(prompt, 40, mode="ar")
        spec = dec.generate(prompt, 40, mode="speculative")
        tree = dec.generate(prompt, 40, mode="tree", branches=3)
        assert spec.tokens == ar.tokens, (length, spec.stats.as_dict())
        assert tree.tokens == ar.tokens, (length, tree.stats.as_dict())
        assert len(ar.tokens) == 40 and ar.stats.tokens_per_forward == 1.0
        assert spec.stats.forwards < ar.stats.forwards or spec.stats.passed[1] == 0
        tested += spec.stats.tested[1]
        passed += spec.stats.passed[1]
        later_branches += sum(tree.stats.kept_branch[1:])
        if length < 24:
            ids, ref = list(prompt[-24:]), []
            while len(ids) < 24 and len(ref) < len(ar.tokens):
                nxt = int(model.next_token_log_probs(torch.tensor([ids])).argmax())
                ids.append(nxt)
                ref.append(nxt)
            assert ar.tokens[: len(ref)] == ref
    assert 0 < passed < tested, (passed, tested)  # both paths of the verification ran
    assert later_branches > 0  # the tree kept a path other than the chain's: its cache moved a path


@pytest.mark.parametrize("trunk", [{}, LLAMA], ids=["gpt", "llama"])
def test_sdpa_and_local_attention_decode_the_same_tokens(trunk):
    """The KV cache under both core attentions (prefill with the kernel's causal mask, single-token steps,
    k-token verification with cached_forward's explicit mask): the same greedy tokens, past a window refill."""
    models = {
        kind: make_model(3, 2, seq=24, sharpen=4.0, head_noise=0.3, attention=kind, trunk_options=trunk)
        for kind in ("local", "sdpa")
    }
    models["sdpa"].load_state_dict(models["local"].state_dict())
    for mode in ("ar", "speculative"):
        out = {
            kind: Decoder(m).generate([3, 1, 4, 1, 5, 9, 2, 6], 40, mode=mode).tokens
            for kind, m in models.items()
        }
        assert out["sdpa"] == out["local"] and len(out["local"]) == 40, mode


def test_eos_ends_both_modes_at_the_same_token():
    model = make_model(3, 2, sharpen=8.0, head_noise=0.05)
    dec = Decoder(model)
    prompt = [3, 1, 4, 1, 5]
    free = dec.generate(prompt, 30, mode="ar").tokens
    eos = free[7]
    ar = dec.generate(prompt, 30, mode="ar", eos_id=eos)
    spec = dec.generate(prompt, 30, mode="speculative", eos_id=eos)
    assert ar.tokens == spec.tokens == free[: free.index(eos)]


# --------------------------------------------------------------------------------- speculative sampling
def test_sampling_transform_on_a_hand_built_distribution():
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]).log()
    top2 = Sampling(greedy=False, top_k=2).transform(p).exp()
    torch.testing.assert_close(top2, torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    nucleus = Sampling(greedy=False, top_p=0.8).transform(p).exp()  # 0.5 + 0.2 < 0.8 <= 0.85
    torch.testing.assert_close(nucleus, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    hot = Sampling(greedy=False, temperature=0.5).transform(p).exp()
    torch.testing.assert_close(hot, p.exp() ** 2 / (p.exp() ** 2).sum())
    assert Sampling(greedy=False, top_p=0.3).transform(p).exp()[0] == 1.0  # the top token always stays
    with pytest.raises(ValueError, match="--temperature"):
        Sampling(temperature=0.0)


def test_accept_or_resample_returns_draws_of_the_verifier():
    p = torch.tensor([0.05, 0.4, 0.3, 0.25, 0.0])
    q = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.2])
    g = torch.Generator().manual_seed(0)
    draws = 20000
    counts = torch.zeros(5)
    for _ in range(draws):
        x = int(torch.multinomial(q, 1, generator=g))
        _, y = accept_or_resample(p.log(), q.log(), x, g)
        counts[y] += 1
    assert counts[4] == 0
    chi = stats.chisquare(counts[:4].numpy(), (p[:4] * draws).numpy())
    assert chi.pvalue > 1e-3, (counts, chi)


def test_recursive_rejection_over_candidates_drawn_without_replacement_returns_draws_of_the_verifier():
    """Tree decoding's test of k children: 3 candidates drawn from q without replacement, tested in draw
    order; the kept token (or the final correction) is distributed as p. Testing each candidate against
    the unchanged p and q instead (no residual, no removal) fails the same test."""
    p = torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05, 0.0])
    q = torch.tensor([0.45, 0.05, 0.1, 0.1, 0.2, 0.1])
    g = torch.Generator().manual_seed(0)

    def naive(log_p, log_q, tokens, gen):
        for i, x in enumerate(tokens):
            ok, _ = accept_or_resample(log_p, log_q, x, gen)
            if ok:
                return i, x
        return None, accept_or_resample(log_p, log_q, tokens[-1], gen)[1]

    draws = 3000
    for accept, ok in ((multi_draft_accept, True), (naive, False)):
        counts = torch.zeros(6)
        for _ in range(draws):
            candidates = draws_without_replacement(q.log(), 3, g).tolist()
            _, y = accept(p.log(), q.log(), candidates, g)
            counts[y] += 1
        pvalue = stats.chisquare(counts[:5].numpy(), (p[:5] * draws).numpy()).pvalue
        assert (counts[5] == 0 and pvalue > 1e-3) if ok else pvalue < 1e-6, (accept.__name__, counts, pvalue)


def exact_sampling_distribution(model: CPModel, prompt: list[int], k: int, s: Sampling) -> dict:
    """P(x_1..x_k) of plain sampling, from full forwards without a cache, over all V^k outcomes."""
    vocab = model.cfg.trunk.vocab_size
    probs = {}
    for seq in itertools.product(range(vocab), repeat=k):
        logp = 0.0
        for j in range(k):
            lp = s.transform(model.next_token_log_probs(torch.tensor([prompt + list(seq[:j])]))[0])
            logp += float(lp[seq[j]])
        probs[seq] = math.exp(logp)
    return probs


def speculative_counts(
    model: CPModel, prompt: list[int], k: int, s: Sampling, draws: int, mode: str
) -> tuple:
    """Outputs of `draws` decodings (counts by output) and how often the tree kept a later child."""
    dec = Decoder(model)
    counts: dict = {}
    later = 0
    for i in range(draws):
        out = dec.generate(prompt, k, mode=mode, branches=2, sampling=s, seed=i)
        counts[tuple(out.tokens)] = counts.get(tuple(out.tokens), 0) + 1
        later += sum(out.stats.kept_branch[1:])
    return counts, later


def chi_square_pvalue(counts: dict, probs: dict, draws: int) -> float:
    keys = sorted(probs)
    observed = [counts.get(key, 0) for key in keys]
    assert sum(observed) == draws, "an output outside the support of plain sampling"
    expected = [probs[key] * draws for key in keys]
    # Pool the rare outcomes so that every expected count is >= 5 (the chi-square approximation).
    big = [i for i, e in enumerate(expected) if e >= 5]
    small = [i for i, e in enumerate(expected) if e < 5]
    obs = [observed[i] for i in big] + ([sum(observed[i] for i in small)] if small else [])
    exp = [expected[i] for i in big] + ([sum(expected[i] for i in small)] if small else [])
    return stats.chisquare(obs, [e * sum(obs) / sum(exp) for e in exp]).pvalue


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["speculative", "tree"])
def test_speculative_sampling_has_the_distribution_of_plain_sampling(monkeypatch, mode):
    """V = 4, n = 3, r = 2, temperature 0.9 and top-k 3: the first three sampled tokens (64 outcomes)
    from 1200 speculative (tree: 2 children per step) decodings against the exact distribution of plain
    sampling (about 70 % of the second drafts are kept, so both the kept drafts and the corrections are
    exercised; the tree also keeps its second child). The same test rejects a decoder that keeps every
    first draft (the draft's conditionals differ from the verifier's)."""
    model = make_model(3, 2, vocab=4, layers=1, sharpen=3.0, head_noise=0.3)
    s = Sampling(greedy=False, temperature=0.9, top_k=3)
    prompt = [1, 2, 3, 0, 2]
    probs = exact_sampling_distribution(model, prompt, 3, s)
    draws = 1200
    counts, later = speculative_counts(model, prompt, 3, s, draws, mode)
    assert chi_square_pvalue(counts, probs, draws) > 1e-3
    assert (later > 0) == (mode == "tree")

    monkeypatch.setattr(
        "cpmtp_dist.inference.decoding.multi_draft_accept", lambda log_p, log_q, tokens, gen: (0, tokens[0])
    )
    wrong, _ = speculative_counts(model, prompt, 3, s, 400, mode)
    assert chi_square_pvalue(wrong, probs, 400) < 1e-6
    assert sampling_mod.multi_draft_accept is multi_draft_accept  # only the decoder's reference was patched


# ---------------------------------------------------------------------------------------- bench decode


def test_bench_decode_fails_on_a_greedy_difference_in_fp32_and_reports_it_in_bf16():
    fp32 = make_model(3, 2, sharpen=4.0, head_noise=0.3)
    bf16 = CPModel(fp32.cfg, params_dtype=torch.bfloat16).eval()  # as `cpmtp bench decode` loads it on a GPU
    bf16.load_state_dict(fp32.state_dict())
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    for model, dtype in ((fp32, "float32"), (bf16, "bfloat16")):
        result = bench_decode(Decoder(model), prompts, 12, sampling=Sampling(), repeats=1)
        assert (result["device"], result["dtype"]) == ("cpu", dtype)
        assert len(result["greedy_first_divergence"]) == 2 and 1 <= result["tokens_per_forward"] <= 3

    class Skewed(Decoder):
        """Speculative outputs with their 6th token changed: a stand-in for a bf16 near-tie."""

        def generate(self, prompt, max_new_tokens, *, mode="ar", **kw):
            out = super().generate(prompt, max_new_tokens, mode=mode, **kw)
            if mode == "speculative":
                out.tokens[5] = (out.tokens[5] + 1) % 64
            return out

    with pytest.raises(
        AssertionError, match=r"prompt 0: greedy speculative .* at new token 5 \(torch.float32\)"
    ):
        bench_decode(Skewed(fp32), prompts, 12, sampling=Sampling(), repeats=1)
    result = bench_decode(Skewed(bf16), prompts, 12, sampling=Sampling(), repeats=1)
    assert result["greedy_first_divergence"] == [5, 5]
    assert first_difference([1, 2], [1, 2]) is None and first_difference([1, 2], [1, 2, 3]) == 2


def test_device_choice_and_dtype_for_decoding(monkeypatch):
    cfg = Config()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(
        ValueError, match=r"--device cuda: no CUDA device is visible to torch; use --device cpu"
    ):
        resolve_device("cuda")
    assert training_dtype(cfg, torch.device("cpu")) == torch.float32  # train.precision=auto
    assert training_dtype(cfg, torch.device("cuda", 0)) == torch.bfloat16
    cfg.train.precision = "fp32"
    assert training_dtype(cfg, torch.device("cuda", 0)) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"--device cpu with CUDA visible: .*hide the GPUs"):
        resolve_device("cpu")
