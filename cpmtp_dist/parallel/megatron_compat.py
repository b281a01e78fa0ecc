"""Make megatron-core 0.16.x run on CPU with gloo (a no-op when CUDA is available).

megatron-core assumes a GPU in a handful of places. Rather than monkeypatching ``torch`` globally, each patch
below is scoped to the megatron module (or function) that needs it:

* a ``torch`` stand-in is bound as the global name ``torch`` of a few megatron modules only; it forwards
  everything to the real ``torch`` except ``torch.cuda.current_device()`` (-> CPU), ``torch.cuda.synchronize()``
  (-> no-op) and tensor factories called with ``device="cuda"`` (-> CPU);
* the causal-mask helpers and the RNG tracker are replaced by CPU versions with the same contract;
* the PP tied-embedding sync runs with ``Tensor.cuda()`` as the identity, for that one method call only.

Covered (checked: 1 process, TP2 and PP2 on gloo match the single process): the dense GPT trunk (local layer
spec), tensor-parallel mappings/layers, RoPE, pipeline p2p and schedules, activation-recompute RNG handling, dist_checkpointing (torch_dist) save and load. Not covered (not on our paths): MoE token dispatchers, megatron's
optimizers / clip-grad / DDP buffers, inference contexts, TransformerEngine and apex fusions.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

_SUPPORTED_SERIES = "0.16."
_CPU = torch.device("cpu")

# The one piece of mutable module state: patches are applied at most once per process.
_applied = False


class _CudaOnCpu:
    """Stands in for ``torch.cuda`` inside a patched megatron module."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None


def _cpu_factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wrap a tensor factory so that ``device="cuda"`` (or ``cuda:N`` / an int) lands on the CPU."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> torch.Tensor:
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    return wrapper


class _TorchOnCpu:
    """Stands in for ``torch`` inside a patched megatron module; everything else is forwarded live."""

    _FACTORIES = ("empty", "zeros", "ones", "full", "tensor", "arange")

    def __init__(self) -> None:
        self.cuda = _CudaOnCpu()
        for name in self._FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


# Modules whose global ``torch`` is swapped for the stand-in, each with why it fails on CPU.
_TORCH_SCOPED_MODULES = {
    # gather/reduce-scatter buffers: torch.empty(..., device=torch.cuda.current_device()) -> "not compiled with CUDA".
    "megatron.core.tensor_parallel.mappings": "buffers on current_device()",
    # GPU init path and the linear-with-grad-accumulation all-gather buffers use current_device().
    "megatron.core.tensor_parallel.layers": "buffers/params on current_device()",
    # split/gather of 1-D chunks (sequence parallel, p2p scatter-gather) allocate on current_device().
    "megatron.core.tensor_parallel.utils": "buffers on current_device()",
    # RotaryEmbedding.get_emb moves inv_freq to current_device() on the first forward.
    "megatron.core.models.common.embeddings.rotary_pos_embedding": "inv_freq.to(current_device())",
    # p2p shape exchange / receive buffers use current_device(), then torch.cuda.synchronize().
    "megatron.core.pipeline_parallel.p2p_communication": "buffers on current_device(), cuda.synchronize()",
    # forward_backward_* build total_num_tokens with torch.zeros([], device="cuda").
    "megatron.core.pipeline_parallel.schedules": 'torch.zeros(..., device="cuda")',
    # GlobalMemoryBuffer (the attention score buffer) allocates on current_device().
    "megatron.core.utils": "GlobalMemoryBuffer on current_device()",
    # dist_checkpointing's torch_dist writer copies tensors to the host, then torch.cuda.synchronize().
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "cuda.synchronize() after the host copy",
    # the save's failure flag and the async queue's liveness flag are tensors on current_device().
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "flags on current_device()",
    "megatron.core.dist_checkpointing.strategies.async_utils": "flags on current_device(), cuda.synchronize()",
    # non-vanilla softmax offsets are created on current_device().
    "megatron.core.transformer.dot_product_attention": "softmax_offset on current_device()",
    # the static KV cache of decoding (Attention._allocate_memory) is allocated on current_device().
    "megatron.core.transformer.attention": "KV cache on current_device()",
}


def _default_causal_mask(sq: int) -> torch.Tensor:
    """[sq, sq] bool mask, True above the diagonal (= masked), as megatron's, but on the CPU."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool, device=_CPU), diagonal=1)


def _sliding_window_causal_mask(sq: int, skv: int, window_size: tuple[int, int]) -> torch.Tensor:
    """[sq, skv] bool mask for sliding-window attention (True = masked), as megatron's, but on the CPU."""
    m = torch.ones(sq, skv, dtype=torch.bool, device=_CPU)
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    return ~torch.tril(mu, diagonal=skv - sq + window_size[1])


def _make_cpu_tracker_class(base: type, default_name: str) -> type:
    """A subclass of megatron's CudaRNGStatesTracker that keeps CPU generator states.

    Contract kept: ``add(name, seed)`` registers a state seeded with ``seed`` without disturbing the current
    one; ``fork(name)`` swaps it into the default (CPU) generator for the block and saves its progress on exit;
    nested forks of different names work. megatron's ``fork`` would also warn that "CPU RNG state changed within
    GPU RNG context" on every dropout call, since here the forked state *is* the CPU state.
    """

    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            # A private generator computes the seeded state, leaving the default generator untouched.
            self.states_[name] = torch.Generator(device=_CPU).manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = default_name) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


def _patch_rng() -> None:
    """Route megatron's RNG tracker and seeding to the CPU default generator."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mrandom

    # CudaRNGStatesTracker.add calls torch.cuda.get_rng_state() -> "not compiled with CUDA"; initialize_rng_tracker
    # looks the class name up at call time, so rebinding it makes every new tracker a CPU one.
    mrandom.CudaRNGStatesTracker = _make_cpu_tracker_class(
        mrandom.CudaRNGStatesTracker, mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME
    )
    mrandom.initialize_rng_tracker(force_reset=True)
    # Activation recompute saves/restores "cuda" RNG state through these two helpers (torch.cuda generators).
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)

    # model_parallel_cuda_manual_seed seeds the (absent) CUDA default generator; on CPU the default generator
    # plays that role, so seed it with the data-parallel seed as well (same value megatron uses).
    orig_seed_fn = mrandom.model_parallel_cuda_manual_seed

    @functools.wraps(orig_seed_fn)
    def model_parallel_cuda_manual_seed(seed: int, *args: Any, **kwargs: Any) -> None:
        torch.manual_seed(seed)
        orig_seed_fn(seed, *args, **kwargs)

    mrandom.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed
    tensor_parallel.model_parallel_cuda_manual_seed = model_parallel_cuda_manual_seed


@contextlib.contextmanager
def _tensor_cuda_is_identity() -> Iterator[None]:
    """Within the block, ``Tensor.cuda()`` returns the tensor itself (megatron calls it as a method)."""
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = orig  # type: ignore[method-assign]


def _patch_tied_embedding_sync() -> None:
    """Under PP, LanguageModule syncs the tied embedding with ``weight.data = weight.data.cuda()``."""
    from megatron.core.models.common.language_module.language_module import LanguageModule

    orig = LanguageModule.setup_embeddings_and_output_layer

    @functools.wraps(orig)
    def setup_embeddings_and_output_layer(self: Any) -> None:
        # Only for the duration of this one method (model construction, single-threaded).
        with _tensor_cuda_is_identity():
            orig(self)

    LanguageModule.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer


def _check_version() -> str:
    from megatron.core import package_info

    version = str(package_info.__version__)
    if not version.startswith(_SUPPORTED_SERIES):
        raise RuntimeError(
            f"cpmtp_dist's CPU compatibility layer supports megatron-core {_SUPPORTED_SERIES}x only, "
            f"found megatron-core {version}; re-check the patches in {__name__} before using this version."
        )
    return version


def maybe_apply_cpu_compat() -> bool:
    """Patch megatron-core for CPU/gloo when CUDA is absent; return whether the CPU layer is in effect.

    Returns False (and touches nothing) when CUDA is available. Raises RuntimeError for a megatron-core outside
    0.16.x. Safe to call any number of times: the patches are applied once per process.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    _check_version()  # checked on every call, so a changed install is never silently accepted
    if _applied:
        return True

    stand_in = _TorchOnCpu()
    for module_name in _TORCH_SCOPED_MODULES:
        module = importlib.import_module(module_name)
        if not hasattr(module, "torch"):
            raise RuntimeError(f"megatron compat: {module_name} no longer has a global 'torch' to patch")
        module.torch = stand_in

    # get_default_causal_mask / get_sliding_window_causal_mask build the mask with device="cuda"; fused_softmax
    # imported them by name, so rebind there too (this is where the causal mask of the local spec comes from).
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _default_causal_mask
        module.get_sliding_window_causal_mask = _sliding_window_causal_mask

    _patch_rng()
    _patch_tied_embedding_sync()
    _applied = True
    return True
