"""`cpmtp plan`: memory per GPU and FLOPs of a config's layouts on a cluster, from the config alone."""

from __future__ import annotations

import argparse
import sys

from cpmtp_dist.config import Config
from cpmtp_dist.config_io import ConfigError, load_config, validate_config
from cpmtp_dist.flops import flops_per_token, forward_flops_per_token
from cpmtp_dist.plan import GIB, Candidate, candidate_layouts, estimate, one_line


def run_plan(args: argparse.Namespace) -> int:
    """Print the config's own layout's estimate, its FLOPs per token and the layouts that fit, ranked."""
    problems = []
    if args.nodes < 1:
        problems.append(f"--nodes {args.nodes}: at least 1")
    if args.gpus_per_node < 1:
        problems.append(f"--gpus-per-node {args.gpus_per_node}: at least 1")
    if not args.gpu_memory_gib > 0:
        problems.append(f"--gpu-memory-gib {args.gpu_memory_gib}: the memory of one GPU in GiB, e.g. 80")
    if problems:
        print("error: cannot plan:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        validate_config(cfg, cuda_available=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    world = args.nodes * args.gpus_per_node
    print(f"{args.config}: {args.nodes} node(s) x {args.gpus_per_node} GPUs of {args.gpu_memory_gib:g} GiB")
    _print_flops(cfg)
    candidates = candidate_layouts(cfg, args.nodes, args.gpus_per_node, args.gpu_memory_gib)
    _print_candidates(candidates, args.top)
    try:
        validate_config(cfg, world_size=world, cuda_available=True)
    except ConfigError as err:
        where = f" (world_size = --nodes {args.nodes} x --gpus-per-node {args.gpus_per_node})"
        print(f"error: the config's own layout does not fit{where}: {err}", file=sys.stderr)
        return 2
    est = estimate(cfg, world, cuda=True)
    par = cfg.parallel
    print(
        f"the config's layout (tp {par.tp}, pp {par.pp}, ep {par.ep}, micro-batch {cfg.train.micro_batch_size}, "
        f"ZeRO-{cfg.optim.zero_stage}):\n  {one_line(est, args.gpu_memory_gib)}\n"
        f"  KV cache for decoding one sequence of {cfg.model.trunk.seq_length} tokens: {est.kv_cache / GIB:.2f} GiB\n"
        f"  ({'; '.join(est.assumptions)}; tensors only: add headroom for the CUDA context, NCCL and fragmentation)"
    )
    if est.total > args.gpu_memory_gib * GIB:
        print(f"warning: {est.total / GIB:.1f} GiB per GPU exceeds {args.gpu_memory_gib:g} GiB")
    return 0


def _print_flops(cfg: Config) -> None:
    trunk, head = forward_flops_per_token(cfg.model)
    flops = flops_per_token(cfg.model, freeze_trunk=cfg.finetune.freeze_trunk)
    print(
        f"model FLOPs per token: {flops.model / 1e9:.2f} G (forward: trunk {trunk / 1e9:.2f} G, CP head "
        f"{head / 1e9:.2f} G; training {'forward + backward' if not cfg.finetune.freeze_trunk else 'head only'}); "
        f"with the chunked loss's recomputation {flops.hardware / 1e9:.2f} G"
    )


def _print_candidates(candidates: list[Candidate], top: int) -> None:
    fitting = [c for c in candidates if c.fits]
    print(
        f"layouts that fit: {len(fitting)} of {len(candidates)}, ranked by the model FLOPs of the busiest rank "
        "per step" + (f" (the first {top})" if len(fitting) > top else "")
    )
    if not fitting:
        best = min(candidates, key=lambda c: c.memory.total, default=None)
        if best is not None:
            print(
                f"  none; the smallest: {best.memory.total / GIB:.1f} GiB with {' '.join(best.overrides())}"
            )
        return
    print("   #  tp  pp  ep   dp  micro  accum  zero  sp   GiB/GPU  TFLOP/GPU/step")
    for i, c in enumerate(fitting[:top], 1):
        print(
            f"{i:>4} {c.tp:>3} {c.pp:>3} {c.ep:>3} {c.dp:>4} {c.micro_batch_size:>6} {c.grad_accum:>6} "
            f"{c.zero_stage:>5}  {'y' if c.sequence_parallel else 'n':>2} {c.memory.total / GIB:>9.1f} "
            f"{c.step_flops / 1e12:>15.1f}"
        )
