"""`cpmtp train`: its arguments and the run.

`launchers/cli.py` (the `cpmtp` command) and the Slurm tasks of `cpmtp submit` (`launchers/submit.py`) both
parse and run `cpmtp train` arguments through this module, so neither imports the other. `parse_anywhere`
lets `key=value` overrides come anywhere among the options, for every command that takes them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from cpmtp_dist.errors import UserError

OVERRIDE = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)*=")
"""A dotted `key=value` setting (model.cp.rank=8)."""


def parse_anywhere(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args(argv)`, except that `key=value` overrides may also follow options: argparse reads a
    command's positionals in one run, so an override after an option would be "unrecognized". Those are
    appended to `overrides`, in their order; anything else unrecognized is an error, as before. The arguments
    are kept as `argv` (the local launcher passes them on to its ranks)."""
    args, extra = parser.parse_known_args(argv)
    late = [x for x in extra if OVERRIDE.match(x)]
    if len(late) < len(extra) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*args.overrides, *late]
    args.argv = list(argv)
    return args


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    """`cpmtp train`'s options and overrides, on `t`."""
    t.add_argument("--config", help="YAML config (defaults < file < overrides)")
    t.add_argument("--run-dir", help="run directory (default: runs/<config>-<time>)")
    t.add_argument(
        "--resume",
        metavar="auto|CHECKPOINT",
        help="continue a run: 'auto' from the newest complete checkpoint of --run-dir (none: start at step 0), "
        "or from a checkpoint folder",
    )
    t.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="run N ranks on this machine (torchrun with a standalone rendezvous); under a launcher: ignored",
    )
    t.add_argument(
        "--tracking-uri",
        metavar="URI|none",
        help="MLflow tracking URI, e.g. http://127.0.0.1:5000 (sets tracking.uri; default: a sqlite file in the "
        "run directory); 'none' turns tracking off",
    )
    t.add_argument(
        "--experiment", help="MLflow experiment (sets tracking.experiment; default: the config file's stem)"
    )
    t.add_argument(
        "--verify-checkpoint",
        choices=["fast", "full"],
        default="fast",
        help="before resuming, check the checkpoint's files against the sizes (fast) or also the CRC-32s (full: "
        "reads every file) recorded when it was saved",
    )
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.cp.rank=8")


def resume_checkpoint(resume: str, run_dir: Path, full: bool, is_rank0: bool) -> Path | None:
    """The checkpoint `--resume` names, checked against the sizes (and with `full` the CRC-32s) its meta.json
    recorded: `auto` takes the newest of the run's that verifies, warning of each newer damaged one (None:
    the run has none yet); a named one that does not verify is refused, naming the file."""
    from cpmtp_dist.checkpoint_paths import (
        ResumeError,
        latest_checkpoint,
        newest_verified_checkpoint,
        verify_checkpoint,
    )

    if resume != "auto":
        found = latest_checkpoint(Path(resume))
        if found is None:
            raise ResumeError(f"--resume {resume}: no complete checkpoint there")
        problem = verify_checkpoint(found, full)
        if problem is not None:
            raise ResumeError(f"--resume {resume}: {problem}; resume from another checkpoint")
        return found
    root = run_dir / "checkpoints"
    found, damaged = newest_verified_checkpoint(root, full) if root.exists() else (None, [])
    for problem in damaged if is_rank0 else ():
        print(f"warning: --resume auto: a damaged checkpoint is skipped: {problem}", file=sys.stderr)
    if found is None and damaged:
        raise ResumeError(
            f"--resume auto: no checkpoint in {root} verifies ({len(damaged)} damaged); resume from another "
            "run's checkpoint with --resume PATH, or start afresh in another --run-dir"
        )
    if found is None and is_rank0:
        print(f"--resume auto: no complete checkpoint in {root}; starting from step 0")
    if damaged and is_rank0:  # a health event for `cpmtp status`
        with open(run_dir / "metrics.jsonl", "a") as f:
            step = json.loads((found / "meta.json").read_text())["step"]
            for problem in damaged:
                f.write(
                    json.dumps({"step": step, "event": "damaged_checkpoint_skipped", "detail": problem})
                    + "\n"
                )
    return found


def train_parser() -> argparse.ArgumentParser:
    """A parser of `cpmtp train`'s arguments alone (a Slurm task's)."""
    p = argparse.ArgumentParser(prog="cpmtp train")
    add_train_arguments(p)
    return p


def train_main(argv: list[str]) -> int:
    """`cpmtp train ARGV` in this process; the exit status."""
    args = parse_anywhere(train_parser(), argv)
    args.argv = ["train", *argv]  # as `cpmtp` would have it (the local launcher reruns `cpmtp ARGV`)
    return run_train(args)


def run_train(args: argparse.Namespace) -> int:
    """Train as `args` (parsed by `parse_anywhere` from `train_parser`'s arguments) say; the exit status."""
    from cpmtp_dist.config_io import load_config, validate_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.tracking_uri is not None:  # the flags win over the file and the overrides
            if args.tracking_uri.lower() == "none":
                cfg.tracking.enabled = False
            else:
                cfg.tracking.uri = args.tracking_uri
        if args.experiment is not None:
            cfg.tracking.experiment = args.experiment
        if cfg.tracking.experiment is None:
            cfg.tracking.experiment = Path(args.config).stem if args.config else "cpmtp"
        launch = args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ
        world = args.nproc_per_node if launch else int(os.environ.get("WORLD_SIZE", "1"))
        validate_config(cfg, world_size=world)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = Path(
        args.run_dir or f"runs/{Path(args.config or 'default').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    if launch:  # this process becomes the launcher of the ranks, which run this command again
        from launchers.local import child_argv, run_local

        return run_local(args.nproc_per_node, child_argv(args.argv, str(run_dir)))
    is_rank0 = int(os.environ.get("RANK", "0")) == 0
    resume = None
    if args.resume is not None:
        try:
            resume = resume_checkpoint(args.resume, run_dir, args.verify_checkpoint == "full", is_rank0)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    elif (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        print(
            f"error: {run_dir} already holds checkpoints: pass --resume auto to continue that run, or another "
            "--run-dir",
            file=sys.stderr,
        )
        return 2
    if resume is not None:
        from cpmtp_dist.resume_check import check_resume_config

        try:
            check_resume_config(resume, cfg)  # before the trainer builds anything
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    from cpmtp_dist.config_io import config_to_dict
    from cpmtp_dist.training.tracking import maybe_build_tracker

    # Started before the trainer's imports (torch, Megatron, DeepSpeed): MLflow's own imports run beside them.
    tracker = maybe_build_tracker(cfg.tracking, run_dir, enabled=is_rank0, params=config_to_dict(cfg))

    from cpmtp_dist.parallel.peers import PEERS_LOST_EXIT_CODE, PeersLost
    from cpmtp_dist.training.trainer import train

    try:
        result = train(cfg, run_dir, resume=resume, tracker=tracker)
    # Unusable data or checkpoint (to resume, or to fine-tune from): the message says what to do. (The
    # trainer has released the tracker: discarded if nothing was logged, else ended FAILED.)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PeersLost as err:  # other ranks are gone: a status of its own, for the launcher and job script
        if err.report:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return PEERS_LOST_EXIT_CODE
    if result.diverged is not None:
        from cpmtp_dist.training.nonfinite import NONFINITE_EXIT_CODE

        if is_rank0:
            print(f"error: {result.diverged}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    if result.preempted:
        from cpmtp_dist.training.preemption import PREEMPTED_EXIT_CODE

        if is_rank0:
            print(f"stopped by a signal after step {result.final_step}; continue with --resume auto")
        return PREEMPTED_EXIT_CODE
    if is_rank0:
        ev = result.eval_metrics
        held_out = (
            f"held-out joint loss {ev['eval_joint_loss']:.4f}, next-token loss {ev['eval_ntp_loss']:.4f}"
            if ev
            else "no held-out evaluation (too few held-out samples)"
        )
        print(f"done: {result.final_step} steps; {held_out}; checkpoint {result.checkpoint}")
    return 0
