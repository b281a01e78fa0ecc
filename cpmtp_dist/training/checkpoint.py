"""Checkpoints written atomically: a temporary folder renamed into place, `latest` written last.

Layout of `<run_dir>/checkpoints/step_0000100/`:
    state/        model weights and optimizer state, Megatron `dist_checkpointing` (torch_dist format):
                  one slice per tensor per writer, keyed by single-process names, loadable by any layout
                  (`parallel/sharded_state.py`) and by one process without torch.distributed
                  (`read_model_state`)
    meta.json     step, tokens seen, the layout that saved it, data-loader state, `healthy` (all finite),
                  `files`: every other file's size and CRC-32 (checked on resume: checkpoint_paths.py)
    rng/          every rank's random-number generator states (rank_00000.pt, ...)
    config.yaml   the resolved config
    tokenizer/    the tokenizer the model was trained with

Note: a crash while saving leaves at most a `*.tmp` folder behind; `latest` still names the previous
complete checkpoint, and `latest_checkpoint` never returns a `*.tmp` folder or one without `meta.json`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpmtp_dist.checkpoint_paths import checkpoint_step, file_digests


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def save_checkpoint(
    root: Path,
    step: int,
    *,
    sharded_state: dict[str, Any],
    meta: dict[str, Any],
    config_yaml: str,
    tokenizer_dir: Path | None,
    on_commit: Callable[[], None] | None = None,
    is_writer: bool = True,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    saves: AsyncSaves | None = None,
) -> Path:
    """Write checkpoint `step` under `root` and return its folder.

    Collective: every rank calls it with its `sharded_state` (`dist_checkpointing` writes each slice
    once, from the rank that holds its main replica, into `state/`); the rank with `is_writer` creates
    the folder and writes everything else. `barrier` synchronises the ranks (a no-op in one process).
    `root` must be on a filesystem all ranks share. `on_commit` runs on the writer once the checkpoint is in
    place and `latest` names it (retention: `Checkpointer`).

    With `saves`, the slices are written by a background process (forked now: it sees the tensors as
    they are at this call, while training goes on) and the folder is renamed into place when every
    rank's writer has finished (`AsyncSaves.poll` / `wait`); until then it is an unfinished `*.tmp`.
    """
    from megatron.core import dist_checkpointing

    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    if saves is not None:
        saves.wait()  # one save at a time: the previous one is renamed into place first
    if is_writer:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "state").mkdir(parents=True)
    barrier()
    request = dist_checkpointing.save(
        sharded_state,
        str(tmp / "state"),
        sharded_strategy=_save_strategy(),
        async_sharded_save=saves is not None,
    )
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if is_writer:
        (tmp / "config.yaml").write_text(config_yaml)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        _write_atomic(tmp / "meta.json", json.dumps({"step": step, **meta}, indent=2))
    if saves is None:
        _digest_own_files(tmp, rank)  # this rank's slices are on disk now

    def commit() -> None:
        if saves is not None:  # every rank's background writer has finished: all ranks are here
            _digest_own_files(tmp, rank)
            barrier()
        if not is_writer:
            return
        _record_digests(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_latest(root, final.name)
        if on_commit is not None:
            on_commit()

    if saves is None:
        barrier()  # every rank's slices and generator states are on disk
        commit()
        barrier()
    else:
        request.add_finalize_fn(commit)  # runs after every rank's writer has finished
        saves.schedule(request, final)
    return final


def _digest_own_files(tmp: Path, rank: int) -> None:
    """Record the size and CRC-32 of the files this rank wrote (its slices, its generator states) in
    `checksums/rank_N.json`: each rank reads only its own files back."""
    own = sorted(str(p.relative_to(tmp)) for p in (tmp / "state").glob(f"__{rank}_*.distcp"))
    own.append(f"rng/rank_{rank:05d}.pt")
    (tmp / "checksums").mkdir(exist_ok=True)
    _write_atomic(tmp / "checksums" / f"rank_{rank:05d}.json", json.dumps(file_digests(tmp, own)))


def _record_digests(tmp: Path) -> None:
    """The writer, once every rank has digested its files: meta.json's "files" lists every file of the
    checkpoint (the ranks' digests, and the writer's own for the rest), then the per-rank lists go."""
    files: dict[str, dict[str, object]] = {}
    for part in sorted((tmp / "checksums").glob("rank_*.json")):
        files |= json.loads(part.read_text())
    shutil.rmtree(tmp / "checksums")
    rest = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.name != "meta.json")
    files |= file_digests(tmp, [name for name in rest if name not in files])
    meta = json.loads((tmp / "meta.json").read_text())
    _write_atomic(tmp / "meta.json", json.dumps({**meta, "files": files}, indent=2))


class AsyncSaves:
    """Checkpoints being written in the background (`checkpoint.async_save`), at most one at a time.

    Every rank calls `poll` at the same points (after each step): while a save is in flight it costs one
    all-reduce of a flag; when all writers are done it renames the folder into place and writes `latest`.
    `wait` blocks until then (before the next save, at the end of training, on preemption).
    """

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue()
        self._in_flight: list[Path] = []

    def schedule(self, request: Any, folder: Path) -> None:
        self._queue.schedule_async_request(request)
        self._in_flight.append(folder)

    def poll(self, blocking: bool = False) -> None:
        if self._in_flight:
            for _ in self._queue.maybe_finalize_async_calls(blocking=blocking):
                self._in_flight.pop(0)

    def wait(self) -> None:
        self.poll(blocking=True)

    def close(self) -> None:
        self.wait()
        self._queue.close()

    def abort(self) -> None:
        """Training failed: let this rank's background writer finish its files, without the collective
        finalisation (other ranks may be gone), and drop the save: its folder stays an unfinished `*.tmp`."""
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        if not self._queue.async_calls:
            return
        for call in self._queue.async_calls:
            process = getattr(call.async_caller, "process", None)
            if process is not None:
                process.join()
        self._queue.async_calls.clear()
        self._in_flight.clear()
        # The writer's results wait in a process-wide queue: left there, the next save of this process (a
        # later `train()` in the same interpreter) would take them for its own and record wrong file offsets.
        results = filesystem_async._results_queue
        while results is not None and not results.empty():
            results.get_nowait()


def start_checkpoint_writer() -> None:
    """Give `dist_checkpointing`'s writer a results queue that survives the job's stop signals (see
    `writer_queue`), before the first save. Every rank calls it once, before training."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from cpmtp_dist.training.writer_queue import start_results_queue

    if not hasattr(filesystem_async, "_results_queue"):
        raise RuntimeError(
            "megatron-core's torch_dist writer has no _results_queue: install megatron-core 0.16.1"
        )
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = start_results_queue()


def _save_strategy() -> Any:
    """torch_dist with one writer thread per rank: no helper processes (CPU jobs run many ranks per node)."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from cpmtp_dist.parallel.megatron_compat import maybe_apply_cpu_compat

    maybe_apply_cpu_compat()  # no-op with CUDA; the trainer has applied it already

    return TorchDistSaveShardedStrategy("torch_dist", 1, thread_count=1)


def load_sharded_state(folder: Path, template: dict[str, Any]) -> dict[str, Any]:
    """Read this rank's slices, as described by `template` (from `parallel.sharded_state`), from
    checkpoint `folder`. Collective over all ranks."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(template, str(folder / "state"))


def read_model_state(folder: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The whole model's weights (single-process names) from checkpoint `folder`, in this process alone:
    no torch.distributed, whatever layout saved it (the inference path). `prefix="optimizer."` reads the
    optimizer's tensors instead."""
    import warnings

    import torch.distributed.checkpoint as dcp

    if not (folder / "state" / ".metadata").exists():
        older = (
            " (it holds model.pt: a checkpoint of an older format, before state/)"
            if (folder / "model.pt").exists()
            else ""
        )
        raise FileNotFoundError(
            f"{folder} holds no state/.metadata, so no weights this version can read{older}"
        )
    reader = dcp.FileSystemReader(str(folder / "state"))
    shapes = reader.read_metadata().state_dict_metadata
    state = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in shapes.items()
        if key.startswith(prefix) and hasattr(md, "size")
    }
    if not state:
        raise FileNotFoundError(f"{folder / 'state'}: no {prefix}* tensors in this checkpoint")
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {key.removeprefix(prefix): t for key, t in state.items()}


def rng_state() -> dict[str, Any]:
    """This process's generator states: torch (CPU and CUDA), numpy, Python."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_latest(root: Path, name: str) -> None:
    """Point `root/latest` at checkpoint `name` (atomically)."""
    _write_atomic(root / "latest", name)


def is_healthy(folder: Path) -> bool:
    """Whether checkpoint `folder` was saved with every weight and optimizer moment finite (`meta.json`
    records it since the trainer checks before saving)."""
    try:
        return json.loads((folder / "meta.json").read_text()).get("healthy") is True
    except (OSError, ValueError):
        return False


def prune_checkpoints(root: Path, keep_last: int, keep_every: int = 0) -> None:
    """Delete complete checkpoints except the newest `keep_last`, the newest healthy one (`is_healthy`),
    whatever `keep_last` says, and those of steps that are multiples of `keep_every` (when > 0). Unfinished
    `*.tmp` folders are left to the next save of their step."""
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    newest_healthy = next((p for p in reversed(done) if is_healthy(p)), None)
    for old in done[:-keep_last]:
        step = checkpoint_step(old)
        if (keep_every > 0 and step % keep_every == 0) or old == newest_healthy:
            continue
        shutil.rmtree(old)
