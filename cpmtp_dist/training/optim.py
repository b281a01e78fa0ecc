"""Optimizer, learning-rate schedule and the DeepSpeed engine around the model.

Note: DeepSpeed owns gradient accumulation, ZeRO sharding of optimizer states (and gradients at
stage 2) and clipping. Three of its defaults would silently change the numerics, so they are set
explicitly here: `gradient_clipping` (DeepSpeed's default is 1.0, ours comes from `optim.grad_clip`),
the optimizer (a client `torch.optim.AdamW`: DeepSpeed's own `AdamW` JIT-compiles a fused kernel),
and the loss scaling of `engine.backward` (the trainer normalises the loss itself, so it calls
`backward(loss, scale_wrt_gas=False)`). In bf16, `bf16.immediate_grad_update` is on: DeepSpeed's
`BF16_Optimizer` (ZeRO-1) otherwise clears `.grad` between micro-batches only in a backward prologue hooked
onto the tensors the forward returns, and the model returns a `CPLossOutput`, so earlier micro-batches'
gradients were accumulated again at every later backward (docs/PARALLEL.md, "Precision").
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from cpmtp_dist.config import OptimConfig
from cpmtp_dist.parallel.heavy_imports import import_deepspeed


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices; never decay biases, norms and other 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    if any(getattr(p, "allreduce", True) is False for p in decay + no_decay):
        # Expert-parallel CP components get groups of their own (see parallel/deepspeed_experts.py).
        import_deepspeed()
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Linear warmup to 1 over `warmup_steps`, then cosine decay to min_lr / lr at `total_steps`."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr / cfg.lr
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    from cpmtp_dist.training.nonfinite import SkippableAdamW

    opt = SkippableAdamW(  # AdamW that `StepGuard` can hold back on a non-finite step
        build_param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg, total_steps))
    return opt, sched


def grad_dtypes(cfg: OptimConfig, *, bf16: bool, pipelined: bool) -> tuple[str, str]:
    """(accumulation, reduction) dtype of the gradients, `auto` resolved: fp32 wherever DeepSpeed supports it
    in a bf16 run (not under ZeRO-0, not under pipeline parallelism); always fp32 in an fp32 run."""
    if not bf16:
        return "fp32", "fp32"
    accum = cfg.grad_accum_dtype
    if accum == "auto":
        accum = "fp32" if cfg.zero_stage >= 1 and not pipelined else "bf16"
    reduce = "fp32" if cfg.grad_reduce_dtype == "auto" else cfg.grad_reduce_dtype
    return accum, reduce


def deepspeed_config(
    cfg: OptimConfig, *, micro_batch_size: int, grad_accum: int, dp: int, bf16: bool, pipelined: bool = False
) -> dict[str, Any]:
    """The DeepSpeed config dict; every setting that affects numerics is explicit.

    Which optimizer wrapper DeepSpeed picks in bf16 (`DeepSpeedEngine._do_optimizer_sanity_check`): ZeRO-0
    steps fp32 copies of the bf16 weights (`FP16_UnfusedOptimizer`); ZeRO-1 with fp32 accumulation uses
    `BF16_Optimizer` (fp32 master partitions and gradient buffers; the bucket and overlap settings other than
    `allgather_bucket_size` do not apply); otherwise ZeRO 1/2 is `DeepSpeedZeroOptimizer` with fp32 master
    partitions. Adam's moments are fp32 in every case.
    """
    accum, reduce = grad_dtypes(cfg, bf16=bf16, pipelined=pipelined)
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * dp,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {
            "stage": cfg.zero_stage,
            # ZeRO-2 only: see OptimConfig.overlap_comm.
            "overlap_comm": cfg.overlap_comm and cfg.zero_stage == 2,
            "contiguous_gradients": cfg.contiguous_gradients,
            "reduce_scatter": cfg.reduce_scatter,
            "reduce_bucket_size": cfg.reduce_bucket_size,
            "allgather_bucket_size": cfg.allgather_bucket_size,
        },
        "bf16": {"enabled": bf16, "immediate_grad_update": True},
        "data_types": {"grad_accum_dtype": accum},
        "communication_data_type": reduce,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def build_engine(
    model: nn.Module,
    cfg: OptimConfig,
    *,
    total_steps: int,
    micro_batch_size: int,
    grad_accum: int,
    dp: int,
    bf16: bool,
    pipelined: bool = False,
    mpu: Any = None,
) -> Any:
    """Wrap `model` in a DeepSpeed engine with AdamW and the warmup-cosine schedule.

    `mpu` tells DeepSpeed the data- and model-parallel groups (see `parallel.layout.DeepSpeedMPU`);
    `pipelined`: Megatron's pipeline schedule runs the micro-batches (see `deepspeed_config`).
    """
    import_deepspeed()  # heavy import; only the trainer needs it
    import deepspeed

    maybe_skip_deepspeed_cpu_ops()
    # DeepSpeed insists on LOCAL_RANK even when torch.distributed is already up (a single process
    # started without a launcher has none).
    os.environ.setdefault("LOCAL_RANK", "0")
    opt, sched = build_optimizer(model, cfg, total_steps)
    ds_cfg = deepspeed_config(
        cfg, micro_batch_size=micro_batch_size, grad_accum=grad_accum, dp=dp, bf16=bf16, pipelined=pipelined
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg, mpu=mpu
    )
    return engine


def maybe_skip_deepspeed_cpu_ops() -> None:
    """On CPU, keep DeepSpeed from JIT-compiling its shared-memory collective (~90 s of g++ per
    fresh machine); gloo does the communication. Reading `__compatible_ops__` would start its
    probe of every op, so the entry is set in the module's namespace directly."""
    if torch.cuda.is_available():
        return
    import_deepspeed()
    import deepspeed.ops

    vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
