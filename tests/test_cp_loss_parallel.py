"""The vocabulary- and expert-parallel CP loss equals the single-device loss, value and gradients.

Several gloo processes each hold a slice of the head (components under ep, vocabulary under tp) and
their own rows (different rows per ep rank, the same rows within a tp group); sums over ranks are
compared with one device holding everything, in float64.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpmtp_dist.config import CPHeadConfig
from cpmtp_dist.model.cp_head import IGNORE_INDEX, CPHead
from cpmtp_dist.model.cp_loss import chunked_cp_loss
from cpmtp_dist.parallel.experts import ExpertShard
from cpmtp_dist.parallel.vocab import VocabShard

D, V, N, R, HORIZON = 6, 12, 5, 4, 3  # N rows per ep rank


def full_problem(kind: str, ep: int):
    torch.manual_seed(0)
    cfg = CPHeadConfig(horizon=HORIZON, rank=R, parameterisation=kind, init_noise_std=0.3)
    head = CPHead(D, V, cfg, params_dtype=torch.float64)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    unembed = torch.randn(V, D, dtype=torch.float64)
    h = torch.randn(ep * N, D, dtype=torch.float64)
    targets = torch.randint(0, V, (ep * N, HORIZON))
    targets[N - 1, 1:] = IGNORE_INDEX
    targets[-3, 0] = IGNORE_INDEX
    return cfg, head, unembed, h, targets


def reference(kind: str, ep: int):
    cfg, head, unembed, h, targets = full_problem(kind, ep)
    unembed.requires_grad_(True)
    h.requires_grad_(True)
    out = chunked_cp_loss(head, h, targets, unembed, chunk_tokens=4, with_accuracy=True)
    out.loss_sum.backward()
    grads = {k: p.grad for k, p in head.named_parameters()}
    return out, grads, unembed.grad, h.grad


def worker(rank: int, world: int, tp: int, kind: str, store: str) -> None:
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    ep = world // tp
    tp_rank, ep_rank = rank % tp, rank // tp
    tp_groups = [dist.new_group([e * tp + t for t in range(tp)]) for e in range(ep)]
    ep_groups = [dist.new_group([e * tp + t for e in range(ep)]) for t in range(tp)]
    v_loc, r_loc = V // tp, R // ep
    vocab = VocabShard(tp_groups[ep_rank], tp, tp_rank * v_loc) if tp > 1 else VocabShard()
    experts = ExpertShard(ep_groups[tp_rank], ep, ep_rank, ep_rank * r_loc) if ep > 1 else ExpertShard()

    cfg, full, unembed, h, targets = full_problem(kind, ep)
    comps, vocab_rows = (
        slice(ep_rank * r_loc, (ep_rank + 1) * r_loc),
        slice(tp_rank * v_loc, (tp_rank + 1) * v_loc),
    )
    head = CPHead(
        D,
        V,
        cfg,
        component_range=(comps.start, comps.stop),
        vocab_range=(vocab_rows.start, vocab_rows.stop),
        params_dtype=torch.float64,
    )

    def local_slice(name: str, t: torch.Tensor) -> torch.Tensor:
        if name.startswith("gate."):
            return t
        t = t[comps]
        return t[:, :, vocab_rows] if name == "unembed" else t

    with torch.no_grad():
        for k, p in head.named_parameters():
            p.copy_(local_slice(k, dict(full.named_parameters())[k]))
    u_loc = unembed[vocab_rows].clone().requires_grad_(True)
    rows = slice(ep_rank * N, (ep_rank + 1) * N)
    h_own = h[rows].clone().requires_grad_(True)
    out = chunked_cp_loss(
        head, h_own, targets[rows], u_loc, chunk_tokens=4, with_accuracy=True, vocab=vocab, experts=experts
    )
    out.loss_sum.backward()

    ref, ref_grads, ref_u, ref_h = reference(kind, ep)
    ep_group = experts.group

    def ep_sum(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if ep > 1:
            dist.all_reduce(t, group=ep_group)
        return t

    tol = {"rtol": 0, "atol": 1e-10}
    torch.testing.assert_close(ep_sum(out.loss_sum.detach()), ref.loss_sum.detach(), **tol)
    torch.testing.assert_close(ep_sum(out.head_correct), ref.head_correct)
    torch.testing.assert_close(ep_sum(out.head_nll_sum), ref.head_nll_sum, **tol)
    torch.testing.assert_close(out.responsibilities, ref.responsibilities[rows], **tol)
    torch.testing.assert_close(h_own.grad, ref_h[rows], **tol)
    for k, p in head.named_parameters():
        # The gate is replicated and sees this rank's rows: its gradient sums over the ep group.
        got = ep_sum(p.grad) if k.startswith("gate.") else p.grad
        torch.testing.assert_close(got, local_slice(k, ref_grads[k]), **tol, msg=lambda m, k=k: f"{k}: {m}")
    if kind == "shared":
        torch.testing.assert_close(ep_sum(u_loc.grad), ref_u[vocab_rows], **tol)
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["shared", "separate"])
@pytest.mark.parametrize("world,tp", [(2, 2), (2, 1), (4, 2)], ids=["tp2", "ep2", "tp2xep2"])
def test_sharded_loss_equals_single_device(kind, world, tp):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, tp, kind, os.path.join(tmp, "store")), nprocs=world, join=True)
