"""Process groups and model-parallel state: the one module that touches ``megatron.core.parallel_state``.

``initialize_parallel`` brings up torch.distributed (from the torchrun/Slurm environment, or as a single CPU
process), applies the CPU compatibility layer when there is no GPU, initialises megatron's model-parallel
groups and seeds megatron's RNG tracker. Everything else in the project reads ranks and groups from the
returned ``ParallelGroups``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from cpmtp_dist.parallel.megatron_compat import maybe_apply_cpu_compat

_ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class ParallelGroups:
    """Ranks, sizes and process groups of the current layout (world = tp * pp * dp; ep splits tp * dp)."""

    rank: int
    world_size: int
    tp_group: dist.ProcessGroup
    tp_rank: int
    tp_size: int
    pp_group: dist.ProcessGroup
    pp_rank: int
    pp_size: int
    dp_group: dist.ProcessGroup
    dp_rank: int
    dp_size: int
    ep_group: dist.ProcessGroup
    ep_rank: int
    ep_size: int
    expert_dp_group: dist.ProcessGroup
    """Ranks holding the same expert shard: where expert gradients are averaged."""
    expert_dp_rank: int
    expert_dp_size: int
    mp_group: dist.ProcessGroup
    """Model-parallel ranks (tp x pp) holding one replica of the model: where gradient norms are summed."""
    mp_rank: int
    is_first_stage: bool
    is_last_stage: bool

    @property
    def sizes(self) -> tuple[int, int, int]:
        """(tp, pp, ep)."""
        return (self.tp_size, self.pp_size, self.ep_size)


@dataclass
class _Session:
    groups: ParallelGroups
    owns_process_group: bool
    store_dir: str | None


# Process-wide by nature (torch.distributed and megatron's parallel_state are process globals too): what
# initialize_parallel created, so that a repeated call returns the same groups and destroy undoes only our part.
_session: _Session | None = None


def _init_process_group() -> str | None:
    """Initialise torch.distributed; return the temp dir of a FileStore we created (single process), if any."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if all(key in os.environ for key in _ENV_KEYS):
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, init_method="env://")
        return None
    # No launcher: a world of one. A FileStore in a private temp dir avoids racing for a free TCP port.
    store_dir = tempfile.mkdtemp(prefix="cpmtp_pg_")
    store = dist.FileStore(os.path.join(store_dir, "store"), 1)
    dist.init_process_group(backend=backend, store=store, rank=0, world_size=1)
    return store_dir


def _read_groups() -> ParallelGroups:
    ps = parallel_state
    return ParallelGroups(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_group=ps.get_data_parallel_group(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        ep_group=ps.get_expert_model_parallel_group(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
        expert_dp_rank=ps.get_expert_data_parallel_rank(),
        expert_dp_size=ps.get_expert_data_parallel_world_size(),
        mp_group=ps.get_model_parallel_group(),
        mp_rank=dist.get_rank(ps.get_model_parallel_group()),
        is_first_stage=ps.is_pipeline_first_stage(),
        is_last_stage=ps.is_pipeline_last_stage(),
    )


def seed_parallel_rng(seed: int) -> None:
    """Seed the default generator and megatron's tracked RNG states (data-, tensor-, expert-parallel).

    Ranks of one tensor-parallel group get different model-parallel streams (seed + 2718 + tp_rank), as in
    megatron. On CPU the compat layer maps the tracker onto the CPU generator.
    """
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def initialize_parallel(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 0) -> ParallelGroups:
    """Bring up torch.distributed and megatron's model-parallel groups; seed the RNGs.

    Idempotent: if already initialised with the same (tp, pp, ep), the same ``ParallelGroups`` object is
    returned; different sizes tear down the model-parallel groups (not the process group) and rebuild them.
    The RNGs are re-seeded with ``seed`` on every call, so the RNG state after this call depends on ``seed`` only.
    """
    global _session
    maybe_apply_cpu_compat()  # first: a wrong megatron version must fail before anything is created
    if not dist.is_initialized():
        if _session is not None:  # someone destroyed our process group behind our back
            destroy_parallel()
        owns, store_dir = True, _init_process_group()
    elif _session is not None:
        owns, store_dir = _session.owns_process_group, _session.store_dir
    else:  # a launcher (or DeepSpeed) already initialised torch.distributed: not ours to destroy
        owns, store_dir = False, None

    if (
        _session is not None
        and _session.groups.sizes == (tp, pp, ep)
        and parallel_state.model_parallel_is_initialized()
    ):
        seed_parallel_rng(seed)
        return _session.groups

    _session = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    try:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            # megatron defaults the expert TP size to tp; our experts (CP components) are never tensor-split.
            expert_tensor_parallel_size=1,
        )
        seed_parallel_rng(seed)
        _session = _Session(groups=_read_groups(), owns_process_group=owns, store_dir=store_dir)
    except BaseException:
        # e.g. sizes that do not divide the world: leave nothing half-built behind.
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        _release_process_group(owns, store_dir)
        raise
    return _session.groups


def get_parallel_groups() -> ParallelGroups:
    """The groups of the last ``initialize_parallel`` call; raises if there was none (or it was destroyed)."""
    if _session is None or not dist.is_initialized():
        raise RuntimeError("parallel state is not initialised: call initialize_parallel() first")
    return _session.groups


def _release_process_group(owns: bool, store_dir: str | None) -> None:
    if owns and dist.is_initialized():
        dist.destroy_process_group()
    if store_dir is not None:
        shutil.rmtree(store_dir, ignore_errors=True)


def destroy_parallel() -> None:
    """Destroy megatron's model-parallel state, and the process group if ``initialize_parallel`` created it."""
    global _session
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if _session is not None:
        _release_process_group(_session.owns_process_group, _session.store_dir)
    _session = None
