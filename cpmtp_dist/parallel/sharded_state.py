"""The model's and the optimizer's state as Megatron `ShardedTensor`s keyed by single-process names: what
makes a checkpoint reshardable across tp, pp, ep and dp.

Every tensor is described by its global shape and this rank's slice of it: tensor-parallel parameters
are split along `partition_dim` over tp, CP components along dimension 0 over ep, and pipeline stages
name their layers as the single-stage model does (`model.global_name`). `dist_checkpointing` writes each
slice once (the rank whose `replica_id` is all zeros) and reads any slice back, whatever layout saved it.

Note: optimizer state. The Adam moments (and, in low precision, the fp32 master weights) are read and
written through DeepSpeed's fragment API (`safe_get_full_optimizer_state` /
`safe_set_full_optimizer_state`): under ZeRO-1/2 a rank holds a fragment of each flattened parameter,
and the API assembles the whole tensor of this rank's model-parallel slice (an all-reduce over the
parameter's data-parallel group). The checkpoint therefore stores moments per parameter, like the
weights, and any layout can load them. Cost: while saving, each rank holds the moments of its
model-parallel slice (what ZeRO-0 would hold), not only its ZeRO fragment.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.dist_checkpointing import ShardedTensor
from torch import Tensor, nn

from cpmtp_dist.parallel.heavy_imports import import_deepspeed
from cpmtp_dist.parallel.state import ParallelGroups

MOMENTS = ("exp_avg", "exp_avg_sq")
"""The state AdamW keeps per parameter (besides its step count)."""


def tp_view(tensor: Tensor, param: nn.Parameter) -> tuple[Tensor, int | None]:
    """`tensor` (shaped like `param` on this rank) as a contiguous slice of its global tensor, and the
    dimension along which tensor parallelism splits it (None: not split).

    A gated MLP's first projection is seen as (2, f_local, d): its rows are [gate; up], and under tensor
    parallelism each rank holds its slice of *both* halves (Megatron splits the local output in two), which
    is contiguous along dimension 1. Initialisation (`model/trunk.py`) and checkpoints (the whole (2, f, d))
    treat it so. Other parameters are returned as they are."""
    dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    if getattr(param, "glu_halves", False):
        return tensor.view(2, tensor.shape[0] // 2, *tensor.shape[1:]), None if dim is None else dim + 1
    return tensor, dim


def _shard(key: str, local: Tensor, p: nn.Parameter, groups: ParallelGroups) -> ShardedTensor:
    """`local` (shaped like parameter `p` on this rank) as a slice of the global tensor `key`."""
    offsets = []
    local, tp_dim = tp_view(local, p)
    tp_split = groups.tp_size > 1 and tp_dim is not None
    ep_split = groups.ep_size > 1 and getattr(p, "expert_parallel", False)
    if tp_split:
        offsets.append((tp_dim, groups.tp_rank, groups.tp_size))
    if ep_split:
        if tp_split and p.partition_dim == 0:
            raise NotImplementedError(f"{key}: split over tp and ep along the same dimension")
        offsets.append((0, groups.ep_rank, groups.ep_size))
    # Ranks holding the same slice: the last stage's copy of the tied embedding, tp peers of an unsplit
    # tensor, and data-parallel peers (the expert-dp group for CP components split over ep).
    replica_id = (
        1 if getattr(p, "ds_pipe_replicated", False) else 0,
        0 if tp_split else groups.tp_rank,
        groups.expert_dp_rank if ep_split else groups.dp_rank,
    )
    return ShardedTensor.from_rank_offsets(key, local, *offsets, replica_id=replica_id)


def _global_names(model: nn.Module, groups: ParallelGroups) -> dict[str, str]:
    return {
        name: (model.global_name(name) if groups.pp_size > 1 else name)
        for name, _ in model.named_parameters()
    }


def sharded_model_state(model: nn.Module, groups: ParallelGroups, *, copy: bool = False) -> dict[str, Any]:
    """`model.<name>` -> this rank's slice of every parameter (the module's own tensors, or fresh
    buffers to load into when `copy`). Buffers that are not parameters are derived, not saved."""
    names = _global_names(model, groups)
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        local = torch.empty_like(p.detach()) if copy else p.detach()
        out[f"model.{names[name]}"] = _shard(f"model.{names[name]}", local, p, groups)
    return out


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)  # DeepSpeed's ZeRO / bf16 wrappers hold the torch optimizer


def _partitioned(p: nn.Parameter) -> bool:
    """Whether DeepSpeed keeps this parameter's optimizer state in flattened fragments (ZeRO-1/2, bf16);
    the mapping is None on ranks whose partition holds none of it."""
    return hasattr(p, "_hp_mapping")


def _masters(engine: Any) -> dict[int, Tensor]:
    """Low-precision parameter id -> its fp32 master copy, where DeepSpeed keeps whole copies (bf16 without
    ZeRO: `FP16_UnfusedOptimizer`, whose torch optimizer steps the copies)."""
    opt = engine.optimizer
    pairs = zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []), strict=True)
    return {id(lp): hp for lp_group, hp_group in pairs for lp, hp in zip(lp_group, hp_group, strict=True)}


def _link_moments(engine: Any) -> None:
    """Point each parameter's fragment mapping at the moments of its flat partition.

    DeepSpeed links them once, after the first optimizer step of the first parameter group, when the
    other groups' moments do not exist yet; those mappings stay empty. Each parameter group of the torch
    optimizer holds one flat partition under ZeRO-1/2 and bf16.
    """
    base = _base_optimizer(engine)
    for p in engine.module.parameters():
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            flat = base.param_groups[mapping.param_group_index]["params"][0]
            mapping.set_optim_state_fragment(flat, base.state[flat])


def _step_tensors(engine: Any) -> list[Tensor]:
    base = _base_optimizer(engine)
    return [st["step"] for st in base.state.values() if "step" in st]


def sharded_optimizer_state(engine: Any, groups: ParallelGroups, *, copy: bool = False) -> dict[str, Any]:
    """`optimizer.<moment>.<name>` (and `optimizer.master.<name>` when the module is not fp32) -> this
    rank's slice, assembled over its data-parallel group; plus the step counts. Collective over dp
    when saving (`copy=False`); `copy=True` gives empty buffers to load into."""
    import_deepspeed()
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    model = engine.module
    names = _global_names(model, groups)
    base = _base_optimizer(engine)
    masters = _masters(engine)
    if not copy:
        _link_moments(engine)
    out: dict[str, Any] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        holder = masters.get(id(p), p)  # the tensor the torch optimizer steps
        keys = [*MOMENTS] + (["master"] if p.dtype != torch.float32 else [])
        for key in keys:
            if copy:
                local = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            elif _partitioned(p):
                local = (
                    safe_get_full_fp32_param(p) if key == "master" else safe_get_full_optimizer_state(p, key)
                )
            else:
                local = holder if key == "master" else base.state[holder][key]
            gkey = f"optimizer.{key}.{names[name]}"
            out[gkey] = _shard(gkey, local.detach().reshape(p.shape).float(), p, groups)
    if copy:  # plain values: saved once by rank 0, read back by every rank
        out["optimizer_step"] = out["lr_step"] = None
    else:
        steps = {float(s) for s in _step_tensors(engine)}
        if len(steps) != 1:
            raise RuntimeError(
                f"the optimizer's parameter groups disagree on the step count: {sorted(steps)}"
            )
        out["optimizer_step"] = steps.pop()
        out["lr_step"] = engine.lr_scheduler.last_epoch
    return out


@torch.no_grad()
def apply_model_state(model: nn.Module, loaded: dict[str, Any], groups: ParallelGroups) -> None:
    """Copy loaded `model.<name>` slices into the module's parameters."""
    names = _global_names(model, groups)
    for name, p in model.named_parameters():
        p.copy_(loaded[f"model.{names[name]}"].reshape(p.shape))


@torch.no_grad()
def ensure_optimizer_state(engine: Any) -> None:
    """Create AdamW's state as its first step would (step 0, zero moments) where it does not exist yet: in
    a fresh engine, or one whose every step so far was skipped (`train.on_nonfinite=skip`), so that it can
    be saved or loaded into. A no-op once every parameter group has stepped."""
    base = _base_optimizer(engine)
    flats = [flat for group in base.param_groups for flat in group["params"]]
    if all(base.state[flat] for flat in flats):
        return
    for flat in flats:
        st = base.state[flat]
        if not st:
            st["step"] = torch.tensor(0.0)
            for key in MOMENTS:
                st[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    _link_moments(engine)


@torch.no_grad()
def apply_optimizer_state(engine: Any, loaded: dict[str, Any], groups: ParallelGroups) -> None:
    """Set the engine's Adam state, master weights, step counts and schedule from loaded slices.

    The moments of a fresh engine do not exist yet (AdamW creates them at its first step), so they are
    created here as AdamW would, then filled. The master weights default to the module's weights.
    """
    import_deepspeed()
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    model = engine.module
    names = _global_names(model, groups)
    base = _base_optimizer(engine)
    masters = _masters(engine)
    ensure_optimizer_state(engine)
    for group in base.param_groups:
        for flat in group["params"]:
            base.state[flat]["step"].fill_(loaded["optimizer_step"])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        gname = names[name]
        master = loaded.get(f"optimizer.master.{gname}", p.detach().float()).reshape(p.shape)
        moments = {key: loaded[f"optimizer.{key}.{gname}"].reshape(p.shape) for key in MOMENTS}
        if _partitioned(p):
            safe_set_full_fp32_param(p, master)
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, moments[key], key)
        else:
            holder = masters.get(id(p), p)
            if holder is not p:
                holder.copy_(master)
            for key in MOMENTS:
                base.state[holder][key].copy_(moments[key])
    sched = engine.lr_scheduler
    sched.last_epoch = loaded["lr_step"] - 1
    sched.step()  # sets every group's learning rate for step `lr_step`, as the saving run had it
