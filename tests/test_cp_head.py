"""The CP head against brute-force enumeration of all V^n continuations (docs/MODEL.md).

The reference here is written independently of `cp_loss.py` and `drafting.py`: it computes factor
probabilities by hand from the head's parameters and sums explicit products over every tuple.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import chisquare

from cpmtp_dist.config import CPHeadConfig
from cpmtp_dist.model.cp_head import IGNORE_INDEX, CPHead
from cpmtp_dist.model.cp_loss import chunked_cp_loss, load_balancing_loss, naive_cp_loss
from cpmtp_dist.model.drafting import draft, next_token_log_probs

D = 6
KINDS = [("shared", "residual"), ("shared", "linear"), ("separate", "residual")]


def make_head(v: int, n: int, r: int, kind: tuple[str, str], seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = CPHeadConfig(horizon=n, rank=r, parameterisation=kind[0], phi=kind[1], init_noise_std=0.5)
    head = CPHead(D, v, cfg, params_dtype=dtype)
    with torch.no_grad():  # move away from the symmetric init so every parameter matters
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.7)
    unembed = torch.randn(v, D, dtype=dtype) * 1.5
    return head, unembed


@torch.no_grad()
def ref_factors(head: CPHead, h: torch.Tensor, unembed: torch.Tensor):
    """w (N, r) and P (N, r, n, V) computed by hand from the parameters (docs/MODEL.md formulas)."""
    w = torch.softmax(h @ head.gate.weight.t() + head.gate.bias, dim=-1)
    probs = torch.empty(h.shape[0], head.rank, head.horizon, head.vocab_size, dtype=h.dtype)
    for a in range(head.rank):
        for s in range(head.horizon):
            if head.parameterisation == "separate":
                logits = h @ head.unembed[a, s].t()
            elif head.phi_kind == "residual":
                z = h + (F.silu(h @ head.phi_w1[a, s].t())) @ head.phi_w2[a, s].t()
                logits = z @ unembed.t()
            else:
                logits = (h @ head.phi_weight[a, s].t()) @ unembed.t()
            probs[:, a, s] = torch.softmax(logits, dim=-1)
    return w, probs


def ref_joint(w: torch.Tensor, probs: torch.Tensor) -> dict[tuple[int, ...], torch.Tensor]:
    """All V^n tuples -> P(tuple) per position (N,)."""
    _, r, n, v = probs.shape
    out = {}
    for x in itertools.product(range(v), repeat=n):
        term = w.clone()
        for s, xs in enumerate(x):
            term = term * probs[:, :, s, xs]
        out[x] = term.sum(-1)
    return out


def ref_nll(joint, targets: torch.Tensor) -> torch.Tensor:
    """-log of the summed probability of all tuples consistent with the known targets (N,)."""
    total = torch.zeros(targets.shape[0], dtype=torch.float64)
    for x, p in joint.items():
        ok = ((targets == torch.tensor(x)) | (targets == IGNORE_INDEX)).all(-1)
        total = total + p * ok
    return -total.log()


CASES = [(v, n, r, k) for v, n, r in [(5, 1, 3), (4, 2, 1), (5, 2, 3), (3, 3, 2), (7, 2, 2)] for k in KINDS]


@pytest.mark.parametrize("v,n,r,kind", CASES)
def test_joint_loss_marginal_against_enumeration(v, n, r, kind):
    head, unembed = make_head(v, n, r, kind)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(5, D, dtype=torch.float64, generator=gen)
    w, probs = ref_factors(head, h, unembed)
    joint = ref_joint(w, probs)
    torch.testing.assert_close(sum(joint.values()), torch.ones(5, dtype=torch.float64))

    targets = torch.randint(0, v, (5, n), generator=gen)
    masked = targets.clone()
    masked[0, -1] = IGNORE_INDEX  # trailing target missing
    masked[1, 0] = IGNORE_INDEX  # first target missing, later ones kept
    masked[2, :] = IGNORE_INDEX  # no target at all: contributes nothing
    for tg in (targets, masked):
        keep = (tg != IGNORE_INDEX).any(-1)
        expected = ref_nll(joint, tg)[keep].sum()
        for impl in (naive_cp_loss, chunked_cp_loss):
            kwargs = {"chunk_tokens": 2} if impl is chunked_cp_loss else {}
            out = impl(head, h, tg, unembed, **kwargs)
            torch.testing.assert_close(out.loss_sum, expected, rtol=1e-10, atol=1e-10)
            assert int(out.num_positions) == int(keep.sum())

    # The next-token distribution is the marginal of the joint over the other n-1 tokens.
    marg = torch.zeros(5, v, dtype=torch.float64)
    for x, p in joint.items():
        marg[:, x[0]] += p
    got = next_token_log_probs(head, h, unembed).exp()
    torch.testing.assert_close(got, marg, rtol=1e-10, atol=1e-12)


def test_factor_logits_follow_the_parameterisation():
    # A bug in CPHead.features would be invisible to tests that share it; check it by hand once more
    # with a residual map whose W2 is non-zero and a linear map that is not the identity.
    for kind in KINDS:
        head, unembed = make_head(5, 2, 2, kind)
        h = torch.randn(3, D, dtype=torch.float64)
        _, probs = ref_factors(head, h, unembed)
        for a, s in itertools.product(range(2), range(2)):
            got = torch.softmax(head.factor_logits(h, a, s, unembed), -1)
            torch.testing.assert_close(got, probs[:, a, s])


@pytest.mark.parametrize("kind", KINDS)
def test_rank_one_is_sum_of_independent_cross_entropies(kind):
    head, unembed = make_head(6, 3, 1, kind)
    h = torch.randn(4, D, dtype=torch.float64)
    targets = torch.randint(0, 6, (4, 3))
    expected = sum(
        F.cross_entropy(head.factor_logits(h, 0, s, unembed), targets[:, s], reduction="sum")
        for s in range(3)
    )
    for impl in (naive_cp_loss, chunked_cp_loss):
        torch.testing.assert_close(impl(head, h, targets, unembed).loss_sum, expected)


def _grads(head, unembed, trunk, x, targets, impl, **kw):
    for p in [*head.parameters(), unembed, *trunk.parameters()]:
        p.grad = None
    h = torch.tanh(trunk(x))  # a small differentiable trunk in front of the head
    out = impl(head, h, targets, unembed, **kw)
    out.loss_sum.backward()
    named = {f"head.{k}": p.grad.clone() for k, p in head.named_parameters()}
    named |= {f"trunk.{k}": p.grad.clone() for k, p in trunk.named_parameters()}
    if head.parameterisation == "shared":
        named["unembed"] = unembed.grad.clone()
    else:  # `separate` never touches the trunk's unembedding
        assert unembed.grad is None
    return out, named


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk,group", [(3, None), (64, None), (3, 3)])
def test_chunked_equals_naive_in_value_and_gradients(kind, chunk, group):
    # group: components whose `shared` features are computed together (None: one here, since V < d + hid;
    # 3 of r = 4: a group of 3 and one of 1).
    v, n, r = 11, 3, 4
    head, unembed = make_head(v, n, r, kind)
    unembed.requires_grad_(True)
    torch.manual_seed(3)
    trunk = torch.nn.Linear(5, D, dtype=torch.float64)
    x = torch.randn(2, 7, 5, dtype=torch.float64)  # (B, T, in)
    targets = torch.randint(0, v, (2, 7, n))
    targets[:, -2:, 1:] = IGNORE_INDEX  # past the end of the sequence
    targets[0, 3, 0] = IGNORE_INDEX  # a masked label in the middle
    ref_out, ref = _grads(head, unembed, trunk, x, targets, naive_cp_loss, with_accuracy=True)
    out, got = _grads(
        head, unembed, trunk, x, targets, chunked_cp_loss, chunk_tokens=chunk, with_accuracy=True, group=group
    )
    torch.testing.assert_close(out.loss_sum, ref_out.loss_sum, rtol=0, atol=1e-10)
    assert got.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-6, msg=f"gradient of {k}")
        assert ref[k].abs().max() > 0, f"{k} receives no gradient"
    for field in ("responsibilities", "component_logp", "head_nll_sum", "head_count", "head_correct"):
        torch.testing.assert_close(getattr(out, field), getattr(ref_out, field))


def test_masked_target_is_marginalised_exactly():
    # Masking target s must equal summing the joint over every value of x_{t+s}.
    head, unembed = make_head(5, 3, 3, KINDS[0])
    h = torch.randn(2, D, dtype=torch.float64)
    targets = torch.tensor([[1, 2, 3], [4, 0, 2]])
    masked = targets.clone()
    masked[:, 1] = IGNORE_INDEX
    total = torch.zeros(2, dtype=torch.float64)
    for val in range(5):
        full = targets.clone()
        full[:, 1] = val
        losses = [-chunked_cp_loss(head, h[i : i + 1], full[i : i + 1], unembed).loss_sum for i in range(2)]
        total = total + torch.stack(losses).exp()
    got = torch.stack(
        [chunked_cp_loss(head, h[i : i + 1], masked[i : i + 1], unembed).loss_sum for i in range(2)]
    )
    torch.testing.assert_close(got, -total.log())


def test_sampled_drafts_follow_the_joint():
    v, n, r = 4, 2, 3
    head, unembed = make_head(v, n, r, KINDS[0], seed=5)
    h = torch.randn(1, D, dtype=torch.float64)
    w, probs = ref_factors(head, h, unembed)
    joint = ref_joint(w, probs)
    tuples = list(joint)
    expected = torch.stack([joint[x][0] for x in tuples])
    draws = 20000
    gen = torch.Generator().manual_seed(0)
    toks = draft(head, h.expand(draws, D), unembed, greedy=False, generator=gen).tokens
    counts = torch.zeros(len(tuples))
    for row in toks.tolist():
        counts[tuples.index(tuple(row))] += 1
    p_ok = chisquare(counts.numpy(), (expected * draws).numpy()).pvalue
    assert p_ok > 1e-3, p_ok
    # The test has power: independent draws from each marginal (ignoring the mixture coupling) fail.
    marg = [sum(joint[x][0] for x in tuples if x[s] == val) for s in range(n) for val in range(v)]
    indep = torch.tensor([marg[x[0]] * marg[v + x[1]] for x in tuples], dtype=torch.float64)
    assert chisquare(counts.numpy(), (indep / indep.sum() * draws).numpy()).pvalue < 1e-6


def test_greedy_draft_and_conditionals_follow_the_chain():
    v, n, r = 5, 3, 3
    head, unembed = make_head(v, n, r, KINDS[1], seed=2)
    h = torch.randn(3, D, dtype=torch.float64)
    w, probs = ref_factors(head, h, unembed)
    joint = ref_joint(w, probs)
    d = draft(head, h, unembed, greedy=True)
    for i in range(3):
        prefix: tuple[int, ...] = ()
        for s in range(n):
            cond = torch.zeros(v, dtype=torch.float64)
            for x, p in joint.items():
                if x[:s] == prefix:
                    cond[x[s]] += p[i]
            cond /= cond.sum()
            torch.testing.assert_close(d.log_q[i, s].exp(), cond)
            assert int(d.tokens[i, s]) == int(cond.argmax())
            prefix = (*prefix, int(d.tokens[i, s]))


def test_load_balancing_loss_formula():
    log_w = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]]))
    gamma = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.0, 0.0, 0.0]])
    has = torch.tensor([True, True, True, False])  # the last position has no target
    mean_w = torch.tensor([1.1, 1.1, 0.8]) / 3
    f = torch.tensor([1.0, 1.0, 1.0]) / 3
    log_w.requires_grad_(True)
    aux = load_balancing_loss(log_w, gamma, has)
    torch.testing.assert_close(aux, 3 * (f * mean_w).sum())
    aux.backward()
    assert log_w.grad[3].abs().sum() == 0  # positions without target carry no gradient


def test_components_do_not_start_identical():
    for kind in KINDS:
        head = CPHead(16, 32, CPHeadConfig(horizon=2, rank=3, parameterisation=kind[0], phi=kind[1]))
        h, u = torch.randn(4, 16), torch.randn(32, 16)
        z = [head.factor_logits(h, a, 0, u) for a in range(3)]
        if kind == ("shared", "residual"):
            # W2 = 0: every component starts as the base model, symmetry broken through W1.
            assert all(torch.equal(z[0], zi) for zi in z)
            assert not torch.equal(head.phi_w1[0, 0], head.phi_w1[1, 0])
        else:
            assert not torch.allclose(z[0], z[1])


def test_the_decoding_copies_of_head_weights_follow_changes_of_the_parameters():
    """`weights_at` keeps contiguous copies under inference mode; a parameter changed in place (an optimizer
    step, load_state_dict) or replaced makes it copy again."""
    head, _ = make_head(7, 3, 2, KINDS[0], seed=4)
    h = torch.randn(2, D, dtype=torch.float64)

    def features() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            kept = head.features_at(h, slice(1, 3))
        with torch.no_grad():
            return kept, head.features_at(h, slice(1, 3))  # outside inference mode: no copies

    before, ref = features()
    torch.testing.assert_close(before, ref, rtol=0, atol=0)
    with torch.no_grad():
        head.phi_w1.mul_(2.0)
    after, ref = features()
    torch.testing.assert_close(after, ref, rtol=0, atol=0)
    assert not torch.equal(after, before)
    head.load_state_dict({k: v * 0.5 for k, v in head.state_dict().items()})
    after, ref = features()
    torch.testing.assert_close(after, ref, rtol=0, atol=0)
