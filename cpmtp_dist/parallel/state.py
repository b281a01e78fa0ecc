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
from datetime import timedelta

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
    """Data-parallel ranks whose CP components together make all r (ep consecutive dp ranks)."""
    ep_rank: int
    ep_size: int
    expert_dp_group: dist.ProcessGroup
    """Data-parallel ranks holding the same components: where component gradients are reduced."""
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


def _init_process_group(timeout: timedelta | None) -> str | None:
    """Initialise torch.distributed (collectives fail after `timeout`; None: torch's default); return the
    temp dir of a FileStore we created (single process), if any."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if all(key in os.environ for key in _ENV_KEYS):
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        return None
    # No launcher: a world of one. A FileStore in a private temp dir avoids racing for a free TCP port.
    store_dir = tempfile.mkdtemp(prefix="cpmtp_pg_")
    store = dist.FileStore(os.path.join(store_dir, "store"), 1)
    dist.init_process_group(backend=backend, store=store, rank=0, world_size=1)
    return store_dir


def _build_expert_groups(ep: int, timeout: timedelta | None) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """The CP components' expert-parallel and expert-data-parallel groups, carved out of megatron's
    data-parallel groups: within each dp group (ordered by dp rank), ep consecutive ranks form an ep
    group, and ranks with the same position in their ep group form an expert-dp group.

    Note: megatron's own expert groups (for MoE MLPs) span tensor-parallel ranks too, whose tokens are
    identical; our components need peers with different tokens, so the groups are built here. Every
    rank creates every group, in the same order, as `new_group` requires.
    """
    ps = parallel_state
    coords = [None] * dist.get_world_size()
    me = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_tensor_model_parallel_rank(),
        ps.get_data_parallel_rank(),
    )
    dist.all_gather_object(coords, me)
    by_replica: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for rank, (pp, tp, dp) in enumerate(coords):
        by_replica.setdefault((pp, tp), []).append((dp, rank))
    ep_group = edp_group = None
    for key in sorted(by_replica):
        ranks = [r for _, r in sorted(by_replica[key])]
        if len(ranks) % ep:
            raise ValueError(f"parallel.ep={ep} does not divide the data-parallel size {len(ranks)}")
        for i in range(0, len(ranks), ep):
            g = dist.new_group(ranks[i : i + ep], timeout=timeout)
            ep_group = g if dist.get_rank() in ranks[i : i + ep] else ep_group
        for j in range(ep):
            g = dist.new_group(ranks[j::ep], timeout=timeout)
            edp_group = g if dist.get_rank() in ranks[j::ep] else edp_group
    return ep_group, edp_group


def _read_groups(ep: int, timeout: timedelta | None) -> ParallelGroups:
    ps = parallel_state
    ep_group, edp_group = _build_expert_groups(ep, timeout)
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
        ep_group=ep_group,
        ep_rank=dist.get_rank(ep_group),
        ep_size=dist.get_world_size(ep_group),
        expert_dp_group=edp_group,
        expert_dp_rank=dist.get_rank(edp_group),
        expert_dp_size=dist.get_world_size(edp_group),
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


def initialize_parallel(
    tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 0, timeout_s: float | None = None
) -> ParallelGroups:
    """Bring up torch.distributed and megatron's model-parallel groups; seed the RNGs. Every group's
    collectives fail after `timeout_s` seconds without their peers (None: torch's and megatron's default,
    30 minutes); it applies to groups created by this call.

    Idempotent: if already initialised with the same (tp, pp, ep), the same ``ParallelGroups`` object is
    returned; different sizes tear down the model-parallel groups (not the process group) and rebuild them.
    The RNGs are re-seeded with ``seed`` on every call, so the RNG state after this call depends on ``seed`` only.
    """
    global _session
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    maybe_apply_cpu_compat()  # first: a wrong megatron version must fail before anything is created
    if not dist.is_initialized():
        if _session is not None:  # someone destroyed our process group behind our back
            destroy_parallel()
        owns, store_dir = True, _init_process_group(timeout)
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
            # The CP components' expert groups are ours (see _build_expert_groups); no megatron MoE here.
            expert_model_parallel_size=1,
            expert_tensor_parallel_size=1,
            **({} if timeout is None else {"distributed_timeout_minutes": timeout.total_seconds() / 60}),
        )
        seed_parallel_rng(seed)
        _session = _Session(groups=_read_groups(ep, timeout), owns_process_group=owns, store_dir=store_dir)
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
