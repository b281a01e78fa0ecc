"""`cpmtp eval`: a checkpoint's held-out losses and its decoding speed-up, in one JSON.

Held-out statistics (the trainer's own, over the held-out micro-batches): joint loss (the L_t of
docs/MODEL.md per position with a target), next-token loss and perplexity, loss and accuracy of each head position's
marginal, expert usage (mean responsibility of each component) and mean gate weight.

Decoding statistics: self-speculative decoding of prompts cut from held-out samples (their first half),
greedy and sampled (temperature 1): tokens per forward and the acceptance of each head position. These
are measured on real decoding runs, not estimated from teacher-forced accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from cpmtp_dist.config_io import load_config
from cpmtp_dist.data.loader import make_targets
from cpmtp_dist.data.source import build_training_data
from cpmtp_dist.inference.decoding import Decoder, DecodeStats
from cpmtp_dist.inference.sampling import Sampling
from cpmtp_dist.model.cp_head import IGNORE_INDEX
from cpmtp_dist.model.cp_model import CPModel
from cpmtp_dist.parallel.state import get_parallel_groups
from cpmtp_dist.training.trainer import StatSums


@torch.no_grad()
def heldout_metrics(model: CPModel, batches: Sequence[torch.Tensor]) -> dict:
    """Statistics of the (B, T + 1) held-out sample batches under `model` (one process)."""
    cp = model.cfg.cp
    device = next(model.parameters()).device
    sums = StatSums(cp.horizon, cp.rank, device)
    gate = torch.zeros(cp.rank, dtype=torch.float64, device=device)
    positions = 0
    for batch in batches:
        tokens, targets = make_targets(batch.to(device), cp.horizon, IGNORE_INDEX)
        out = model(tokens, targets, with_accuracy=True)
        sums.add(out, torch.zeros((), device=device))
        gate += out.log_weights.exp().sum(0).double()
        positions += out.log_weights.shape[0]
    stats = sums.reduce(get_parallel_groups(), num_micro=len(batches))
    stats.pop("aux_loss")
    stats["ntp_ppl"] = math.exp(min(stats["ntp_loss"], 50.0))
    stats["gate_weight"] = [round(w, 5) for w in (gate / max(positions, 1)).tolist()]
    stats["heldout_sequences"] = sum(b.shape[0] for b in batches)
    return stats


def merge_stats(runs: Sequence[DecodeStats]) -> dict:
    """Totals over decoding runs: tokens per forward = all accepted / all forwards, acceptance of head
    position s = all kept / all tested drafts at s."""
    total = DecodeStats(
        mode=runs[0].mode,
        horizon=runs[0].horizon,
        branches=runs[0].branches,
        new_tokens=sum(r.new_tokens for r in runs),
        forwards=sum(r.forwards for r in runs),
        accepted=sum(r.accepted for r in runs),
        seconds=sum(r.seconds for r in runs),
        tested=[sum(col) for col in zip(*(r.tested for r in runs), strict=True)],
        passed=[sum(col) for col in zip(*(r.passed for r in runs), strict=True)],
        kept_branch=[sum(col) for col in zip(*(r.kept_branch for r in runs), strict=True)],
    )
    return {
        "sequences": len(runs),
        "new_tokens": total.new_tokens,
        "forwards": total.forwards,
        "tokens_per_forward": total.tokens_per_forward,
        "acceptance": total.acceptance,
        "seconds": total.seconds,
        **({"branches": total.branches, "kept_branch": total.kept_branch} if total.mode == "tree" else {}),
    }


def decoding_metrics(
    decoder: Decoder,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    sampling: Sampling,
    mode: str = "speculative",
    eos_id: int | None = None,
    seed: int = 0,
) -> dict:
    runs = [
        decoder.generate(p, max_new_tokens, mode=mode, sampling=sampling, eos_id=eos_id, seed=seed + i).stats
        for i, p in enumerate(prompts)
    ]
    return merge_stats(runs)


def heldout_prompts(batches: Sequence[torch.Tensor], count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of the first `count` held-out samples."""
    rows = torch.cat(list(batches))[:count]
    return [row[:length].tolist() for row in rows]


def evaluate_checkpoint(
    model: CPModel,
    batches: Sequence[torch.Tensor],
    *,
    prompts: int,
    new_tokens: int,
    eos_id: int | None = None,
) -> dict:
    """Everything `cpmtp eval` reports."""
    out = {"heldout": heldout_metrics(model, batches)}
    if prompts > 0:
        decoder = Decoder(model)
        ps = heldout_prompts(batches, prompts, max(1, model.cfg.trunk.seq_length // 2))
        out["decoding"] = {
            "prompt_tokens": len(ps[0]),
            "greedy": decoding_metrics(decoder, ps, new_tokens, sampling=Sampling(), eos_id=eos_id),
            "sampling_t1": decoding_metrics(
                decoder, ps, new_tokens, sampling=Sampling(greedy=False), eos_id=eos_id
            ),
        }
    return out


def flat_metrics(result: dict) -> dict[str, float]:
    """The numbers of an evaluation as flat MLflow metric names."""
    flat: dict[str, float] = {}
    for key, value in result["heldout"].items():
        flat[f"eval_{key}"] = value
    for kind, stats in result.get("decoding", {}).items():
        if not isinstance(stats, dict):
            continue
        flat[f"decode_{kind}_tokens_per_forward"] = stats["tokens_per_forward"]
        flat[f"decode_{kind}_acceptance"] = stats["acceptance"]
    return flat


def heldout_batches(
    checkpoint_config: Path, tokenizer_fingerprint: str, data: str | None, num_batches: int
) -> list[torch.Tensor]:
    """Held-out micro-batches for a checkpoint: from `data` (a shard folder or blend, as `data.path`), or
    by default from the data the checkpoint was trained on (its config's held-out split)."""
    overrides = [f"train.eval_batches={num_batches}"]
    if data is not None:
        overrides.append(f"data.path={data}")
    cfg = load_config(checkpoint_config, overrides)
    d = build_training_data(cfg, dp_rank=0, dp_size=1)
    if d.tokenizer.fingerprint != tokenizer_fingerprint:
        raise ValueError(
            f"{data or cfg.data.corpus}: its tokenizer ({d.tokenizer_dir}) is not the one the checkpoint was "
            "trained with: evaluate on data tokenised with the checkpoint's tokenizer/"
        )
    if not d.valid:
        raise ValueError(
            f"no held-out micro-batch to evaluate: {d.shortfall}; pass --data with shards that hold a "
            "held-out split"
        )
    return d.valid
