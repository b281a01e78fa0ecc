"""Whether a checkpoint can continue a run as now configured, decided from files alone (no torch).

A resumed run may change its layout, schedule, logging and checkpoint cadence (RESUMABLE), not the model,
the data and their order, or the objective: the weights and the data position would not fit, or would
continue another run than the one saved. `check_resume_config` lists every such difference at once, before
anything is built or read (`cpmtp train --resume`, and the trainer's restore).
"""

from __future__ import annotations

import json
from pathlib import Path

from cpmtp_dist.checkpoint_paths import ResumeError
from cpmtp_dist.config import Config
from cpmtp_dist.config_io import config_to_dict, flatten, load_config

__all__ = ["RESUMABLE", "check_resume_config", "resume_conflicts"]

RESUMABLE = (
    "parallel.",  # the layout: checkpoints reshard
    "optim.",  # the schedule, the optimizer's settings, DeepSpeed's communication
    "checkpoint.",
    "tracking.",
    "train.steps",
    "train.micro_batch_size",  # the accumulation: the global batch stays
    "train.precision",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.measure_memory",
    "train.peak_tflops",
    "train.on_nonfinite",  # how divergence is handled
    "train.max_nonfinite_skips",
    "train.spike_",
    "model.trunk.attention",  # implementations of the same function
    "model.cp.loss_impl",
    "model.cp.chunk_tokens",
    "model.trunk.init_method_std",  # used at initialisation only
    "model.cp.init_noise_std",
    "data.num_workers",  # the data position decides whether it can change (docs/DATA.md)
    "data.verify_checksums",
    "data.skip_corrupt_shards",
    "finetune.init_from",  # the weights come from the checkpoint
)
"""Settings a resumed run may change; every other one (the model, the data and their order, the objective)
must equal the checkpoint's."""


def resume_conflicts(saved: Config, now: Config) -> list[str]:
    """The settings of `now` that differ from a checkpoint's `saved` config and that a resumed run cannot
    change (not in RESUMABLE), each as "key: saved in the checkpoint, now new"."""
    a, b = flatten(config_to_dict(saved)), flatten(config_to_dict(now))
    return [
        f"{key}: {a.get(key)!r} in the checkpoint, {b.get(key)!r} now"
        for key in sorted(a.keys() | b.keys())
        if a.get(key) != b.get(key) and not key.startswith(RESUMABLE)
    ]


def check_resume_config(folder: Path, cfg: Config) -> None:
    """Refuse to resume checkpoint `folder` with `cfg` (before anything is built or read) when the checkpoint
    cannot continue it: a converted model (weights only), or settings of `cfg` that differ from the
    checkpoint's in what a resumed run cannot change; the `ResumeError` lists every one."""
    meta_file, saved_file = folder / "meta.json", folder / "config.yaml"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if "converted_from" in meta:  # `cpmtp convert from-hf`: weights only, no optimizer state or data position
        raise ResumeError(
            f"--resume {folder}: a checkpoint converted from {meta['converted_from']} holds weights only; "
            f"start a run from it with finetune.init_from={folder}"
        )
    if not saved_file.exists():
        raise ResumeError(f"--resume {folder}: no config.yaml, so not a complete checkpoint of this project")
    conflicts = resume_conflicts(load_config(saved_file), cfg)
    if conflicts:
        raise ResumeError(
            f"--resume {folder}: these settings differ from the checkpoint's, and a resumed run must keep "
            "them:\n" + "\n".join(f"  - {c}" for c in conflicts) + "\nDrop the overrides (the checkpoint's "
            f"config.yaml holds its values), or start a new run from its weights with finetune.init_from={folder}"
        )
