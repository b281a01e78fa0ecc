"""Sequence parallelism (tp = 2, gloo): the trunk really runs on sequence shards, and the model's loss and
every gradient equal those of the same tp = 2 model without it (same seed, same tokens). The same launch
checks a model converted from Hugging Face at tp = 2 against transformers (`test_hf.check_tp2`)."""

from __future__ import annotations

import importlib.util
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cpmtp_dist.config import CPHeadConfig, ModelConfig, TrunkConfig
from cpmtp_dist.data.loader import make_targets
from cpmtp_dist.model.cp_head import IGNORE_INDEX
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.parallel.layout import build_vocab_shard
from cpmtp_dist.parallel.state import destroy_parallel, initialize_parallel

B, T = 2, 16


def worker(rank: int, port: int, normalization: str, hf_case: tuple[str, str] | None) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    groups = initialize_parallel(tp=2, seed=0)
    trunk = TrunkConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        seq_length=T,
        vocab_size=64,
        normalization=normalization,
    )
    cfg = ModelConfig(trunk=trunk, cp=CPHeadConfig(horizon=2, rank=2))
    vocab = build_vocab_shard(groups, trunk.vocab_size)
    models = {sp: CPModel(cfg, vocab=vocab, sequence_parallel=sp, seed=0) for sp in (False, True)}
    seen: dict[str, list[tuple[int, ...]]] = {"layer": [], "final": []}
    sp = models[True].trunk.decoder
    sp.layers[0].input_layernorm.register_forward_hook(
        lambda m, i, o: seen["layer"].append(tuple(i[0].shape))
    )
    sp.final_layernorm.register_forward_hook(lambda m, i, o: seen["final"].append(tuple(i[0].shape)))

    batch = torch.randint(0, trunk.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(1))
    tokens, targets = make_targets(batch, cfg.cp.horizon, IGNORE_INDEX)
    outs = {}
    for flag, model in models.items():
        outs[flag] = model(tokens, targets)
        outs[flag].loss_sum.backward()

    # Each tp rank normalises T / 2 positions, sequence-first.
    assert seen == {"layer": [(T // 2, B, 32)], "final": [(T // 2, B, 32)]}, seen
    torch.testing.assert_close(outs[True].loss_sum, outs[False].loss_sum, rtol=1e-6, atol=1e-5)
    ref = dict(models[False].named_parameters())
    names = [name for name, _ in models[True].named_parameters()]
    assert names == list(ref)
    for name, p in models[True].named_parameters():
        torch.testing.assert_close(
            p.grad, ref[name].grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"rank {rank} {name}: {m}"
        )
    if hf_case is not None:
        from test_hf import check_tp2

        diff = check_tp2(groups, *hf_case)
        if rank == 0:
            print(f"converted Llama at tp2: max abs differences to transformers {diff}", flush=True)
    destroy_parallel()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_sequence_parallel_equals_plain_tensor_parallel(normalization, tmp_path):
    hf_case = None
    if normalization == "RMSNorm" and importlib.util.find_spec("transformers") is not None:
        from test_hf import prepare_tp2_case

        hf_case = prepare_tp2_case(tmp_path)
    mp.spawn(worker, args=(free_port(), normalization, hf_case), nprocs=2, join=True)
    if normalization == "RMSNorm" and hf_case is None:  # reported, not passed over in silence
        pytest.skip(
            "sequence parallelism checked; the converted Llama's tp2 check needs the hf extra (.[hf])"
        )
