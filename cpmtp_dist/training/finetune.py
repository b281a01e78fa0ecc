"""Head-only fine-tuning: start from a trained checkpoint, freeze the trunk, distil the base model.

`load_initial_weights` copies a source checkpoint's weights into a freshly built model (any layout, like
a resume, but step 0 and a fresh optimizer); `freeze_trunk` stops the trunk's training; `build_teacher`
rebuilds the source's own head as the frozen base model of the distillation loss
(`cp_loss.distillation_kl_sum`). See docs/FINETUNE.md.

Note: heads of another shape. When the source head has another horizon or rank (typically a next-token
model, n = 1, r = 1), each target factor (a, s) starts as the source's (a mod r_src, min(s, n_src - 1)):
the first r_src components are exact copies, so the draft starts as the base model's next-token model at
every head position. The copies a >= r_src would stay identical to their originals (same gradients), so
N(0, model.cp.init_noise_std) noise is added to their W1 (`residual`), phi weight (`linear`) or
unembedding (`separate`); each (a, s) block is drawn from a generator seeded by (train.seed, parameter
name, a, s), so every layout and rank draws the same numbers. The gate is copied when r matches, else
zeroed (uniform weights). Source tensors missing or with other trailing dimensions (another
parameterisation, phi or phi width) leave the target's seeded initialisation in place.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from cpmtp_dist.checkpoint_paths import FinetuneError
from cpmtp_dist.model.cp_head import CPHead, upcast
from cpmtp_dist.model.drafting import next_token_log_probs
from cpmtp_dist.training.checkpoint import load_sharded_state, read_model_state

if TYPE_CHECKING:  # Megatron is imported by whoever builds a model
    from cpmtp_dist.model.cp_model import CPModel
    from cpmtp_dist.parallel.state import ParallelGroups

NOISY = ("phi_w1", "phi_weight", "unembed")
"""The component tensors whose duplicated copies get symmetry-breaking noise, per parameterisation."""


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Global shape of every `model.*` tensor of checkpoint `folder`, from its metadata alone."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(folder / "state")).read_metadata().state_dict_metadata
    return {k: tuple(md.size) for k, md in metadata.items() if k.startswith("model.") and hasattr(md, "size")}


def _gather(obj: Any) -> list[Any]:
    """`obj` of every rank (a one-element list without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _trunk_problems(src: dict[str, tuple[int, ...]], mine: dict[str, tuple[int, ...]]) -> list[str]:
    """Every rank's trunk keys against the source's (collective: all ranks agree on the outcome)."""
    problems = []
    for key, shape in mine.items():
        if key.startswith("model.trunk.") and src.get(key) != shape:
            there = "missing" if key not in src else f"{src[key]}"
            problems.append(f"{key}: shape {shape} here, {there} in the checkpoint")
    gathered = _gather((sorted(k for k in mine if k.startswith("model.trunk.")), problems))
    all_mine = {k for keys, _ in gathered for k in keys}
    problems = sorted({p for _, probs in gathered for p in probs})
    problems += [
        f"{key}: shape {shape} in the checkpoint, missing here"
        for key, shape in sorted(src.items())
        if key.startswith("model.trunk.") and key not in all_mine
    ]
    return problems


def _seed(seed: int, name: str, a: int, s: int) -> int:
    return zlib.crc32(f"{seed}:{name}:{a}:{s}".encode())


def _vocab_slice(t: Tensor, p: torch.nn.Parameter, groups: ParallelGroups, dim: int) -> Tensor:
    """This rank's vocabulary slice of the whole-vocabulary tensor `t` (dimension `dim` of `t`)."""
    if groups.tp_size > 1 and getattr(p, "tensor_model_parallel", False):
        size = p.shape[p.partition_dim]
        return t.narrow(dim, groups.tp_rank * size, size)
    return t


@torch.no_grad()
def _build_component(
    name: str,
    src: Tensor,
    p: torch.nn.Parameter,
    global_shape: tuple[int, ...],
    head: CPHead,
    groups: ParallelGroups,
    *,
    seed: int,
    noise_std: float,
) -> None:
    """Fill this rank's slice `p` of component tensor `head.<name>` (r, n, ...) from the source's (r_src,
    n_src, ...): factor (a, s) from (a mod r_src, min(s, n_src - 1)), noise on the copies a >= r_src."""
    r_src, n_src = src.shape[:2]
    c0, r_loc, n = head.component_start, head.num_local_components, global_shape[1]
    comps = torch.tensor([a % r_src for a in range(c0, c0 + r_loc)])
    heads = torch.tensor([min(s, n_src - 1) for s in range(n)])
    w = upcast(src.index_select(0, comps).index_select(1, heads))  # (r_local, n, ...)
    w = _vocab_slice(w, p, groups, dim=2)
    if name in NOISY and noise_std > 0:
        for i, a in enumerate(range(c0, c0 + r_loc)):
            if a < r_src:
                continue  # an exact copy of a source component
            for s in range(n):
                gen = torch.Generator().manual_seed(_seed(seed, f"head.{name}", a, s))
                noise = torch.randn(global_shape[2:], generator=gen, dtype=w.dtype) * noise_std
                w[i, s] += _vocab_slice(noise, p, groups, dim=0)
    p.copy_(w)


@torch.no_grad()
def load_initial_weights(model: CPModel, folder: Path, groups: ParallelGroups, seed: int) -> str:
    """Start `model` (this rank's part, any layout) from the weights of checkpoint `folder`; returns a short
    description of what was loaded and what was built. Collective over all ranks.

    Tensors of equal global shape are read through the sharded load (each rank its slice). The trunk must
    match exactly; a mismatch raises `FinetuneError` naming every key and both shapes, on every rank,
    before anything is read. Head tensors of another shape are built from the source head (module doc).
    """
    from cpmtp_dist.parallel.sharded_state import _global_names, sharded_model_state

    src = checkpoint_shapes(folder)
    template = sharded_model_state(model, groups, copy=True)
    mine = {key: tuple(t.global_shape) for key, t in template.items()}
    problems = _trunk_problems(src, mine)
    if problems:
        raise FinetuneError(
            f"finetune.init_from: the trunk of {folder} does not match this model's; set model.trunk.* as in "
            f"{folder / 'config.yaml'}:\n" + "\n".join(f"  - {p}" for p in problems)
        )
    same = {key: t for key, t in template.items() if src.get(key) == mine[key]}
    loaded = load_sharded_state(folder, same)
    names = _global_names(model, groups)
    params = dict(model.named_parameters())
    for name, p in params.items():
        key = f"model.{names[name]}"
        if key in loaded:  # stored views (sharded_state.tp_view) back to the parameter's shape
            p.copy_(loaded[key].reshape(p.shape))
    rebuild = sorted(key for key in mine if key not in same)  # head tensors only: the trunk matched
    n_trunk = sum(k.startswith("model.trunk.") for k in same)
    parts = [f"{n_trunk} trunk and {len(same) - n_trunk} head tensors loaded from {folder}"]
    if not rebuild:
        return "; ".join(parts)

    source_head = read_model_state(folder, prefix="model.head.")
    head = model.head
    built, reset, kept = [], [], []
    noise_std = model.cfg.cp.init_noise_std
    for key in rebuild:
        name = key.removeprefix("model.head.")
        p = params[f"head.{name}"]
        s_t = source_head.get(name)
        if name.startswith("gate."):
            p.zero_()  # r differs: uniform mixture weights
            reset.append(name)
        elif s_t is None or s_t.dim() != p.dim() or tuple(s_t.shape[2:]) != mine[key][2:]:
            kept.append(name)  # nothing to build from: keep the seeded initialisation
        else:
            _build_component(name, s_t, p, mine[key], head, groups, seed=seed, noise_std=noise_std)
            built.append(name)
    if built:
        src_shape = source_head[built[0]].shape[:2]
        tgt_shape = mine[f"model.head.{built[0]}"][:2]
        noisy = [b for b in built if b in NOISY]
        noise = f", N(0, {noise_std}) noise on the copies' {', '.join(noisy)}" if noisy else ""
        parts.append(
            f"built from the source head (r={src_shape[0]}, n={src_shape[1]} -> r={tgt_shape[0]}, "
            f"n={tgt_shape[1]}): {', '.join(built)}{noise}"
        )
    if reset:
        parts.append(f"reset to a uniform gate: {', '.join(reset)}")
    if kept:
        parts.append(f"not in the source at this shape, initialised from train.seed: {', '.join(kept)}")
    return "; ".join(parts)


def freeze_trunk(model: CPModel) -> int:
    """Stop training the trunk (the tied unembedding included): no gradient, hence no optimizer state.
    Call it before the engine is built. Returns the number of frozen parameters (this rank's)."""
    frozen = 0
    for p in model.trunk.parameters():
        p.requires_grad_(False)
        frozen += p.numel()
    return frozen


@dataclass
class Teacher:
    """The base model of the distillation loss: the source checkpoint's own (frozen) head on the model's
    frozen trunk and tied unembedding. A plain object, not a module, so that it never joins the model's
    parameters, optimizer or checkpoints."""

    head: CPHead
    unembedding: Tensor
    """The model's (V, d) tied unembedding (frozen: shared, not copied)."""

    @torch.no_grad()
    def log_probs(self, h: Tensor) -> Tensor:
        """log P_base(x_{t+1} | h_t): (N, d) -> (N, V), fp32."""
        return next_token_log_probs(self.head, h, self.unembedding)


def build_teacher(model: CPModel, folder: Path) -> Teacher:
    """The source checkpoint's head (its config.yaml's `model.cp`, its weights), frozen, on the model's
    device and dtype, sharing the model's unembedding."""
    from cpmtp_dist.config_io import load_config

    src_cfg = load_config(folder / "config.yaml")
    p0 = next(model.head.parameters())
    with torch.random.fork_rng(devices=[]):  # its random init is overwritten: leave the generators alone
        head = CPHead(
            src_cfg.model.trunk.hidden_size,
            src_cfg.model.trunk.vocab_size,
            src_cfg.model.cp,
            params_dtype=p0.dtype,
        )
    head.load_state_dict(read_model_state(folder, prefix="model.head."), strict=True)
    head.requires_grad_(False).eval().to(p0.device)
    return Teacher(head=head, unembedding=model.unembedding())
