"""The checkpoints of one training run: save, verify, restore and retention, in one object the trainer owns.

The files and their atomic writing are `training/checkpoint.py`'s; finding and verifying checkpoints on disk
is `checkpoint_paths.py`'s (torch-free, shared with the launchers). `Checkpointer` decides when a state may
be saved (every weight and moment finite: `nonfinite.ready_to_save`), what a checkpoint records, which
checkpoints retention keeps, which one a rewind goes back to, and how a checkpoint of any layout is loaded
into this run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cpmtp_dist.checkpoint_paths import ResumeError, checkpoint_step, complete_checkpoints, verify_checkpoint
from cpmtp_dist.config import Config
from cpmtp_dist.data.source import gather_loader_state
from cpmtp_dist.parallel.sharded_state import (
    apply_model_state,
    apply_optimizer_state,
    sharded_model_state,
    sharded_optimizer_state,
)
from cpmtp_dist.parallel.state import ParallelGroups
from cpmtp_dist.resume_check import check_resume_config
from cpmtp_dist.training.checkpoint import (
    AsyncSaves,
    checkpoint_name,
    is_healthy,
    load_sharded_state,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
    write_latest,
)
from cpmtp_dist.training.nonfinite import ready_to_save


def layout_of(groups: ParallelGroups, cfg: Config) -> dict[str, int]:
    """The layout a checkpoint records: what a resume may change (everything reshards) and reports. The
    world size is tp * pp * dp (ep splits dp)."""
    return {
        "tp": groups.tp_size,
        "pp": groups.pp_size,
        "ep": groups.ep_size,
        "dp": groups.dp_size,
        "zero_stage": cfg.optim.zero_stage,
    }


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Checkpoints of `run_dir/checkpoints` for a run of `cfg` training `engine` on `loader`'s data.

    Every method is collective (all ranks call it at the same point); rank 0 writes the shared files.
    `close` must run however training ends: it waits for a background save (`checkpoint.async_save`).
    """

    def __init__(
        self,
        run_dir: Path,
        cfg: Config,
        *,
        engine: Any,
        groups: ParallelGroups,
        loader: Any,
        device: torch.device,
        tokenizer_dir: Path | None,
        config_yaml: str,
    ) -> None:
        self.root = run_dir / "checkpoints"
        self.cfg, self.engine, self.groups, self.loader = cfg, engine, groups, loader
        self.device, self.tokenizer_dir, self.config_yaml = device, tokenizer_dir, config_yaml
        self.is_writer = groups.rank == 0
        self.tokens_per_step = cfg.train.global_batch_size * cfg.model.trunk.seq_length
        self.saves = AsyncSaves() if cfg.checkpoint.async_save else None
        self.last: Path | None = None
        """The newest checkpoint this run saved (it may still be written in the background)."""

    # --- saving ---------------------------------------------------------------------------------------
    def save(self, step: int) -> Path | None:
        """Checkpoint the state after step `step`, unless a weight or moment is not finite on some rank
        (then a warning and None: `latest` and the older checkpoints stay as they are)."""
        if not ready_to_save(self.engine, self.device, step, announce=self.is_writer):
            return None
        tic = time.perf_counter()
        model = self.engine.module
        folder = save_checkpoint(
            self.root,
            step,
            sharded_state=sharded_model_state(model, self.groups)
            | sharded_optimizer_state(self.engine, self.groups),
            meta={
                "tokens_seen": step * self.tokens_per_step,
                "layout": layout_of(self.groups, self.cfg),
                "loader": gather_loader_state(self.loader, self.groups),  # every dp rank's position
                "healthy": True,  # every weight and moment finite: retention keeps the newest such one
            },
            config_yaml=self.config_yaml,
            tokenizer_dir=self.tokenizer_dir,
            on_commit=self._retain,
            is_writer=self.is_writer,
            rank=self.groups.rank,
            barrier=_barrier,
            saves=self.saves,
        )
        if self.is_writer:
            how = "training blocked; written in the background" if self.saves else "written"
            print(f"checkpoint {folder.name}: {time.perf_counter() - tic:.2f} s ({how})", flush=True)
        self.last = folder
        return folder

    def save_if_due(self, step: int) -> None:
        """The periodic checkpoint (`checkpoint.every`); lets a background save finish when it can."""
        every = self.cfg.checkpoint.every
        if every and step % every == 0:
            self.save(step)
        if self.saves is not None:
            self.saves.poll()

    def ensure_saved(self, step: int) -> Path | None:
        """A checkpoint of step `step` (at the end of training, on preemption), unless there is one."""
        if self.last is None or self.last.name != checkpoint_name(step):
            self.save(step)
        return self.last

    def _retain(self) -> None:
        """Retention, after each save is in place (on the writer): `checkpoint.keep_last` and `keep_every`;
        the newest healthy checkpoint is always kept (`prune_checkpoints`)."""
        c = self.cfg.checkpoint
        if c.keep_last > 0:
            prune_checkpoints(self.root, c.keep_last, c.keep_every)

    def wait(self) -> None:
        if self.saves is not None:
            self.saves.wait()

    def close(self, *, failed: bool = False) -> None:
        """Wait for a background save and stop the background writer (idempotent). After a failure the save
        in flight is dropped, without the collective finalisation: other ranks may be gone."""
        if self.saves is not None:
            self.saves.abort() if failed else self.saves.close()
            self.saves = None

    # --- finding and restoring ------------------------------------------------------------------------
    def newest_healthy(self, before: int | None = None) -> Path | None:
        """The newest complete checkpoint that was saved healthy and verifies (sizes; `checkpoint_paths`),
        of a step below `before` when given. A background save is finished first."""
        self.wait()
        if not self.root.exists():
            return None
        for folder in reversed(complete_checkpoints(self.root)):
            if before is not None and checkpoint_step(folder) >= before:
                continue
            if is_healthy(folder) and verify_checkpoint(folder) is None:
                return folder
        return None

    def discard_after(self, step: int) -> list[str]:
        """Delete this run's checkpoints of steps after `step` (a rewind abandons them) and point `latest` at
        step `step`'s; returns their names."""
        self.wait()
        _barrier()  # every rank has chosen what to rewind to before anything is deleted
        gone = [p.name for p in complete_checkpoints(self.root) if checkpoint_step(p) > step]
        if self.is_writer:
            for name in gone:
                shutil.rmtree(self.root / name)
            write_latest(self.root, checkpoint_name(step))
        _barrier()
        if self.last is not None and self.last.name in gone:
            self.last = self.root / checkpoint_name(step)
        return gone

    def check(self, folder: Path) -> None:
        """Before a resume reads any weight: `folder` continues this run's model and data (`resume_check`) and
        its files are whole (sizes: `checkpoint_paths.verify_checkpoint`). Raises ResumeError."""
        check_resume_config(folder, self.cfg)
        problem = verify_checkpoint(folder)
        if problem is not None:
            raise ResumeError(f"--resume {folder}: {problem}")

    def restore(self, folder: Path, *, data: bool = True) -> tuple[int, dict[str, Any]]:
        """Load checkpoint `folder`, saved at any layout, into the engine, the model, the generators and
        (with `data`) the loader; returns its step and meta.

        Weights, Adam moments, step counts and the learning-rate schedule come from the sharded `state/`
        (`parallel/sharded_state.py`), resliced for this layout. The generators are restored per rank when
        the world size is unchanged (otherwise each rank keeps its seeded state: the next steps draw no random
        numbers in training, only dropout would). The data position: see `docs/DATA.md` ("Resuming"); a
        rewind (`data=False`) keeps the loader where it is, skipping the batches since `folder`.
        """
        meta = json.loads((folder / "meta.json").read_text())
        if data:
            try:  # first: the data position may refuse this layout, before anything heavy is read
                self.loader.load_state_dict(meta["loader"])
            except ValueError as err:
                raise ResumeError(f"--resume {folder}: {err}") from err
        engine, groups = self.engine, self.groups
        template = sharded_model_state(engine.module, groups, copy=True)
        template |= sharded_optimizer_state(engine, groups, copy=True)
        loaded = load_sharded_state(folder, template)
        apply_model_state(engine.module, loaded, groups)
        apply_optimizer_state(engine, loaded, groups)
        step = int(meta["step"])
        engine.global_steps = step
        engine.global_samples = step * self.cfg.train.global_batch_size
        saved = meta["layout"]
        rng = folder / "rng" / f"rank_{groups.rank:05d}.pt"
        if rng.exists() and saved["tp"] * saved["pp"] * saved["dp"] == groups.world_size:
            set_rng_state(torch.load(rng, weights_only=False))
        return step, meta
