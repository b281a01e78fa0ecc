"""Head-only fine-tuning: the distillation loss against brute-force enumeration, the `finetune` settings,
and `cpmtp train` from a next-token checkpoint to a rank-r CP head with a frozen trunk, end to end."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from cpmtp_dist.config_io import ConfigError, load_config, validate_config
from cpmtp_dist.model.cp_head import IGNORE_INDEX
from cpmtp_dist.model.cp_loss import distillation_kl_sum, draft_cross_entropy, naive_cp_loss
from cpmtp_dist.training.checkpoint import read_model_state
from cpmtp_dist.training.trainer import objective_sum
from test_cp_head import KINDS, D, make_head
from test_train_cli import SMALL, cpmtp

V, N, R, B, T = 5, 3, 2, 2, 4


def make_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """h (B, T, D) and targets (B, T, N): the next N tokens of each sequence, missing past its end, and
    one masked label in the middle of a prefix (it must be marginalised out)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    seq = torch.randint(0, V, (B, T + 1), generator=g)
    targets = torch.full((B, T, N), IGNORE_INDEX)
    for t in range(T):
        for s in range(1, N + 1):
            if t + s <= T:
                targets[:, t, s - 1] = seq[:, t + s]
    targets[0, 0, 0] = IGNORE_INDEX  # a masked label: position (0, 0) still has targets s = 2, 3
    return h, targets


class HandTeacher:
    """A base model made by hand: log_softmax(h W^T) with fixed random W (V, D)."""

    def __init__(self) -> None:
        self.weight = torch.randn(V, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(h @ self.weight.t(), dim=-1)


def factors(head, h: torch.Tensor, unembed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (R,) and P (R, N, V) at one position h (D,), by hand from the parameters (docs/MODEL.md); differentiable."""
    w = torch.softmax(head.gate.weight @ h + head.gate.bias, dim=-1)
    rows = []
    for a, s in itertools.product(range(R), range(N)):
        if head.parameterisation == "separate":
            logits = head.unembed[a, s] @ h
        elif head.phi_kind == "residual":
            logits = unembed @ (h + head.phi_w2[a, s] @ torch.nn.functional.silu(head.phi_w1[a, s] @ h))
        else:
            logits = unembed @ (head.phi_weight[a, s] @ h)
        rows.append(torch.softmax(logits, dim=-1))
    return w, torch.stack(rows).reshape(R, N, V)


def reference_kl_sum(head, h, targets, unembed, teacher) -> torch.Tensor:
    """sum of KL(p_s || q_s) by enumerating the joint over all V^N tuples (docs/MODEL.md), conditioning it on the
    data prefix (summing out masked labels) and marginalising the later tokens; differentiable."""
    total = torch.zeros((), dtype=torch.float64)
    for b, t in itertools.product(range(B), range(T)):
        w, probs = factors(head, h[b, t], unembed)  # (R,), (R, N, V)
        joint = torch.stack(
            [
                sum(w[a] * math.prod(probs[a, s, x[s]] for s in range(N)) for a in range(R))
                for x in itertools.product(range(V), repeat=N)
            ]
        ).reshape((V,) * N)  # joint[x_1, ..., x_N]
        for s in range(N):
            if targets[b, t, s] == IGNORE_INDEX:
                continue
            cond = joint
            for j in range(s):  # the prefix: the data token, or summed out where masked
                x_j = int(targets[b, t, j])
                cond = cond.sum(0) if x_j == IGNORE_INDEX else cond[x_j]
            q = cond.sum(dim=tuple(range(1, N - s))) if s < N - 1 else cond  # later tokens summed out: (V,)
            q = q / q.sum()
            # The base at position t + s - 1: a fixed target, no gradient flows into it.
            p = torch.softmax(h[b, t + s].detach() @ teacher.weight.t(), dim=-1)
            total = total + (p * (p.log() - q.log())).sum()
    return total


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: "-".join(k))
def test_distillation_kl_matches_brute_force_values_and_gradients(kind):
    head, unembed = make_head(V, N, R, kind)
    unembed.requires_grad_(True)
    h, targets = make_batch()
    h.requires_grad_(True)
    teacher = HandTeacher()
    wrt = [h, unembed, *head.parameters()]
    ref = reference_kl_sum(head, h, targets, unembed, teacher)
    ref_grads = torch.autograd.grad(ref, wrt, allow_unused=True)
    for chunk in (3, 1024):  # chunks that cut sequences apart, and one chunk
        got = distillation_kl_sum(head, h, targets, unembed, teacher.log_probs, chunk_tokens=chunk)
        torch.testing.assert_close(got, ref)
        grads = torch.autograd.grad(got, wrt, allow_unused=True)
        for x, g, r in zip(wrt, grads, ref_grads, strict=True):
            if r is None:  # the shared unembedding under `separate`
                assert g is None or not g.any()
            else:
                torch.testing.assert_close(g, r, msg=lambda m, x=x: f"{tuple(x.shape)}: {m}")
    assert ref > 0


def test_draft_conditionals_chain_to_the_joint_nll():
    """sum_s -log q_s(x_{t+s}) with q_s given the true prefix is the CP loss L_t: beta = 0 is plain CP."""
    head, unembed = make_head(V, N, R, KINDS[0])
    h, targets = make_batch()
    h2, tg2 = h.reshape(-1, D), targets.reshape(-1, N)
    one_hot = torch.nn.functional.one_hot(tg2.clamp_min(0), V).to(h2.dtype)  # p_s: the data token itself
    nll = draft_cross_entropy(
        head.gate_log_weights(h2), head.factor_logits_at(h2, unembed, slice(None)), tg2, one_hot
    )
    torch.testing.assert_close(nll, naive_cp_loss(head, h, targets, unembed).loss_sum)


def test_the_objective_mixes_ce_and_kl_and_is_the_cp_loss_at_beta_0():
    head, unembed = make_head(V, N, R, KINDS[0])
    h, targets = make_batch()
    out = naive_cp_loss(head, h, targets, unembed)
    plain = objective_sum(out, 0.0)
    assert plain is out.loss_sum
    out.distill_kl_sum = distillation_kl_sum(head, h, targets, unembed, HandTeacher().log_probs)
    torch.testing.assert_close(objective_sum(out, 0.0), out.loss_sum)
    torch.testing.assert_close(objective_sum(out, 1.0), out.distill_kl_sum)
    torch.testing.assert_close(objective_sum(out, 0.25), 0.75 * out.loss_sum + 0.25 * out.distill_kl_sum)


# --- settings ------------------------------------------------------------------------------------------


def _problems(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(load_config(None, overrides), cuda_available=False)
    return info.value.problems


def _fake_checkpoint(root: Path) -> Path:
    """A folder `latest_checkpoint` accepts: enough for the settings' checks."""
    step = root / "checkpoints" / "step_0000010"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    return root / "checkpoints"


def test_distillation_settings_are_checked(tmp_path):
    ckpt = _fake_checkpoint(tmp_path)
    ok = [f"finetune.init_from={ckpt}", "finetune.freeze_trunk=true", "finetune.distill_weight=0.5"]
    validate_config(load_config(None, ok), cuda_available=False)
    problems = _problems([*ok, "parallel.tp=2"])
    assert (
        len(problems) == 1
        and "finetune.distill_weight=0.5 is not supported with parallel.tp=2" in problems[0]
    )
    problems = _problems([*ok, "parallel.ep=2", "optim.zero_stage=1"])
    assert len(problems) == 1 and "parallel.ep=2" in problems[0] and "not supported" in problems[0]
    problems = _problems(["finetune.distill_weight=0.5"])  # neither init_from nor freeze_trunk
    assert any("needs finetune.init_from" in p for p in problems)
    assert any("needs finetune.freeze_trunk=true" in p for p in problems)
    assert any("outside [0, 1]" in p for p in _problems([*ok[:2], "finetune.distill_weight=1.5"]))
    problems = _problems(["finetune.freeze_trunk=true"])
    assert len(problems) == 1 and "without finetune.init_from" in problems[0]
    problems = _problems([*ok[:2], "parallel.pp=2", "optim.zero_stage=1"])
    assert (
        len(problems) == 1 and "finetune.freeze_trunk=true is not supported with parallel.pp=2" in problems[0]
    )


def test_a_missing_source_checkpoint_is_named(tmp_path):
    problems = _problems([f"finetune.init_from={tmp_path / 'nowhere'}"])
    assert (
        len(problems) == 1
        and problems[0].startswith("finetune.init_from=")
        and "does not exist" in problems[0]
    )
    (tmp_path / "empty").mkdir()
    problems = _problems([f"finetune.init_from={tmp_path / 'empty'}"])
    assert len(problems) == 1 and "no complete checkpoint" in problems[0]


# --- end to end ------------------------------------------------------------------------------------------

# A corpus of about 2k training tokens, seen several times: the loss trend stands out of the batch noise.
DATA = ["data.max_chars=30000", "data.heldout_fraction=0.5"]
BASE = [*SMALL, *DATA, "train.steps=40", "checkpoint.every=40", "model.cp.horizon=1", "model.cp.rank=1"]
FT_STEPS = 30


def ft_args(base: Path) -> list[str]:
    return [
        *SMALL,
        *DATA,
        f"train.steps={FT_STEPS}",
        "train.log_every=10",
        "train.eval_every=10",
        "optim.lr=1e-2",
        "checkpoint.every=10",
        f"finetune.init_from={base / 'checkpoints'}",
        "finetune.freeze_trunk=true",
        "finetune.distill_weight=0.5",
        "model.cp.horizon=3",
        "model.cp.rank=2",
    ]


def train_cmd(run: Path, *args: str, cache: Path, resume: bool = False):
    extra = ["--resume", "auto"] if resume else []
    cmd = ["train", "--config", "configs/tiny.yaml", "--run-dir", str(run), "--tracking-uri", "none", *extra]
    res = cpmtp(*cmd, *args, cache=cache)
    return res


def rows_by_step(run: Path) -> dict[int, dict]:
    """metrics.jsonl merged per step (training and evaluation rows)."""
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            out.setdefault(row["step"], {}).update(row)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    base, ft = tmp / "base", tmp / "ft"
    res = train_cmd(base, *BASE, cache=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    res = train_cmd(ft, *ft_args(base), cache=tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp, base, ft, res.stdout


@pytest.mark.slow
def test_finetuning_trains_the_head_only_and_lowers_the_loss(runs):
    _, base, ft, stdout = runs
    assert "finetune:" in stdout and "built from the source head (r=1, n=1 -> r=2, n=3)" in stdout
    src = read_model_state(base / "checkpoints" / "step_0000040")
    got = read_model_state(ft / "checkpoints" / f"step_{FT_STEPS:07d}")
    trunk = [k for k in src if k.startswith("trunk.")]
    assert trunk and {k for k in got if k.startswith("trunk.")} == set(trunk)
    for k in trunk:  # bit for bit
        assert torch.equal(got[k], src[k]), k
    assert all(k.startswith(("trunk.", "head.")) for k in got)  # the teacher is no part of the checkpoint
    assert got["head.phi_w1"].shape[:2] == (2, 3) and got["head.gate.weight"].shape[0] == 2
    for name in ("phi_w1", "phi_w2"):  # component (0, 0) started as the source's own; it has moved
        assert not torch.equal(got[f"head.{name}"][0, 0], src[f"head.{name}"][0, 0]), name
    assert got["head.gate.weight"].abs().sum() > 0  # started uniform (zeros)
    rows = rows_by_step(ft)
    assert sorted(rows) == [10, 20, 30]
    first, last = rows[10], rows[FT_STEPS]
    assert {"joint_loss", "distill_kl", "loss", "eval_joint_loss"} <= last.keys()
    assert last["loss"] == pytest.approx(0.5 * last["joint_loss"] + 0.5 * last["distill_kl"])
    losses = [rows[s]["loss"] for s in sorted(rows)]  # the objective, (1 - beta) CE + beta KL
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.1, losses
    assert last["joint_loss"] < first["joint_loss"] and all(rows[s]["distill_kl"] > 0 for s in rows)
    # Only the head has optimizer state.
    moments = read_model_state(ft / "checkpoints" / f"step_{FT_STEPS:07d}", prefix="optimizer.")
    assert moments and all(".head." in k for k in moments)


@pytest.mark.slow
def test_a_finetuned_run_resumes_exactly(runs):
    tmp, base, ft, _ = runs
    resumed = tmp / "resumed"
    shutil.copytree(ft, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{FT_STEPS:07d}")  # the newest is now step 20
    res = train_cmd(resumed, *ft_args(base), cache=tmp, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "step_0000020" in res.stdout
    assert "finetune: weights from the resumed checkpoint" in res.stdout
    before, after = rows_by_step(ft), rows_by_step(resumed)
    for key in ("joint_loss", "distill_kl", "eval_joint_loss"):
        assert after[FT_STEPS][key] == before[FT_STEPS][key], key
    a = read_model_state(ft / "checkpoints" / f"step_{FT_STEPS:07d}")
    b = read_model_state(resumed / "checkpoints" / f"step_{FT_STEPS:07d}")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_trunk_of_another_shape_is_refused_before_training(runs):
    tmp, base, _, _ = runs
    run = tmp / "mismatch"
    args = [*ft_args(base), "model.trunk.hidden_size=32"]
    res = train_cmd(run, *args, cache=tmp)
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr
    assert "finetune.init_from" in err and "model.trunk.embedding.word_embeddings.weight" in err
    assert "(512, 32)" in err and "(512, 64)" in err and "config.yaml" in err
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()
