"""`cpmtp submit`: send a training run to Slurm through submitit, one task per GPU (or per CPU process).

Each task sets its rank and the rendezvous from the Slurm environment and runs `cpmtp train` in-process
with `--resume auto`; before the time limit (or on preemption) the run checkpoints and the job requeues
itself, and the requeued job continues from that checkpoint.

Note: the warning signal. Slurm sends SIGUSR2 to every task `--signal-delay` seconds before the time limit.
submitit installs a SIGUSR2 handler that, on global rank 0, pickles `TrainJob.checkpoint()` and runs
`scontrol requeue` at once. While training, the trainer's own handler (cpmtp_dist/training/preemption.py)
replaces it: every rank only sets a flag, the ranks agree on a step, save a checkpoint together and
`train()` returns with status 3, which restores submitit's handler. Only then does each task raise SIGUSR2
again, so submitit's requeue (and its count of timeouts) runs after the checkpoint is complete, never
during it. The non-zero ranks then end without a result: a result written now would be taken as the
job's once the requeued run has finished on rank 0 but not yet on them.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

from cpmtp_dist.config import Config

PREEMPTED = 3  # cpmtp_dist.training.preemption.PREEMPTED_EXIT_CODE, without importing torch here


class TrainJob(submitit.helpers.Checkpointable):
    """`cpmtp train ARGS` on one task of a Slurm job; requeued with `--resume auto` when preempted."""

    def __init__(self, train_args: list[str]) -> None:
        self.train_args = list(train_args)

    def __call__(self) -> str:
        dist_env = submitit.helpers.TorchDistributedEnvironment()
        # The trainer picks its GPU by LOCAL_RANK, so every task keeps all the node's GPUs visible; the
        # job's own values replace any RANK or MASTER_* that came along from the submitting shell.
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)
        # submitit names the first node; its address as Slurm knows it also works where no DNS resolves names.
        os.environ["MASTER_ADDR"] = node_address(dist_env.master_addr)
        # As torchrun does: one thread per rank unless told otherwise (the task's CPUs when Slurm says).
        os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))

        from launchers.train_cmd import train_main

        status = train_main(self.train_args)
        if status == PREEMPTED:
            # The trainer has saved and given the warning signal's handler back to submitit: hand it the
            # signal now. On rank 0 it pickles checkpoint() below, requeues the job and exits.
            signal.raise_signal(getattr(signal, f"SIG{submitit.JobEnvironment.USR_SIG}"))
            print(f"rank {dist_env.rank}: checkpoint saved; rank 0 requeues the job", flush=True)
            sys.exit(PREEMPTED)
        if status != 0:
            raise RuntimeError(f"cpmtp train {shlex.join(self.train_args)} exited with status {status}")
        return self.run_dir

    @property
    def run_dir(self) -> str:
        return self.train_args[self.train_args.index("--run-dir") + 1]

    def checkpoint(self, *args: object, **kwargs: object) -> submitit.helpers.DelayedSubmission:
        """The requeued job: the same training, continued from the newest complete checkpoint of the run
        directory (or as first asked, e.g. from another run's checkpoint, while it holds none yet)."""
        from cpmtp_dist.checkpoint_paths import latest_checkpoint

        ckpts = Path(self.run_dir) / "checkpoints"
        saved = ckpts.is_dir() and latest_checkpoint(ckpts) is not None
        return submitit.helpers.DelayedSubmission(
            TrainJob(with_resume_auto(self.train_args) if saved else self.train_args)
        )


def node_address(node: str) -> str:
    """The address Slurm reaches `node` at (`NodeAddr` of `scontrol show node`); the name itself when
    scontrol says none."""
    try:
        shown = subprocess.run(
            ["scontrol", "show", "node", node], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return node
    found = re.search(r"\bNodeAddr=(\S+)", shown)
    return found.group(1) if found else node


def with_resume_auto(train_args: list[str]) -> list[str]:
    args = list(train_args)
    if "--resume" in args:
        i = args.index("--resume")
        del args[i : i + 2]
    return [*args, "--resume", "auto"]


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time_minutes(text: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; whole minutes, rounded up."""
    m = _TIME.match(text.strip())
    if not m:
        raise ValueError(f"--time {text!r}: expected minutes, M:S, H:M:S or D-H[:M[:S]] (e.g. 90, 4:00:00)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    return -(-seconds // 60)


def plan(args: argparse.Namespace) -> tuple[dict[str, object], list[str], Path]:
    """Check the request and the config; the executor's parameters, the `cpmtp train` arguments of the
    first run, and the submitit folder. Raises ValueError listing every problem."""
    problems: list[str] = []
    if shutil.which("sbatch") is None:
        problems.append(
            "sbatch not found: `cpmtp submit` runs on a Slurm login node (or use slurm/train.sbatch)"
        )
    if args.nodes < 1:
        problems.append(f"--nodes {args.nodes}: at least 1")
    if args.gpus_per_node < 0:
        problems.append(f"--gpus-per-node {args.gpus_per_node}: 0 (CPU) or more")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else max(args.gpus_per_node, 1)
    if tasks < 1:
        problems.append(f"--tasks-per-node {tasks}: at least 1")
    if args.gpus_per_node > 0 and tasks != args.gpus_per_node:
        problems.append(
            f"--tasks-per-node {tasks} with --gpus-per-node {args.gpus_per_node}: one task per GPU; "
            "leave --tasks-per-node out (it is for CPU jobs)"
        )
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        problems.append(f"--cpus-per-task {args.cpus_per_task}: at least 1")
    minutes = None
    try:
        minutes = parse_time_minutes(args.time)
    except ValueError as err:
        problems.append(str(err))
    if args.signal_delay < 1:
        problems.append(f"--signal-delay {args.signal_delay}: at least 1 second")
    elif minutes is not None and args.signal_delay >= minutes * 60:
        problems.append(
            f"--signal-delay {args.signal_delay} s is not shorter than --time {args.time}: the job would be "
            "warned before it starts; give more --time or a shorter --signal-delay"
        )
    config_found = args.config is None or Path(args.config).is_file()
    if not config_found:
        problems.append(f"--config {args.config}: no such file")

    run_dir = Path(
        args.run_dir or f"runs/{Path(args.config or 'default').stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    ).absolute()
    ckpts = run_dir / "checkpoints"
    if args.resume is None and ckpts.is_dir() and any(ckpts.iterdir()):
        problems.append(
            f"{run_dir} already holds checkpoints: pass --resume auto to continue, or another --run-dir"
        )

    train_args = ["--run-dir", str(run_dir), *args.overrides]
    if args.config is not None:
        train_args = ["--config", str(Path(args.config).absolute()), *train_args]
    train_args += [
        "--resume",
        str(Path(args.resume).absolute()) if args.resume not in (None, "auto") else "auto",
    ]

    world_size = args.nodes * tasks
    if (
        config_found and args.nodes >= 1 and tasks >= 1
    ):  # `cpmtp train`'s own checks of its arguments and config,
        # for the world size of this job
        from cpmtp_dist.config_io import ConfigError, load_config, validate_config
        from launchers.train_cmd import parse_anywhere, train_parser

        try:
            train = parse_anywhere(train_parser(), train_args)
            cfg = load_config(train.config, train.overrides)
            validate_config(cfg, world_size=world_size, cuda_available=args.gpus_per_node > 0 or None)
            print_estimate(cfg, world_size, gpus=args.gpus_per_node > 0, gpu_memory_gib=args.gpu_memory_gib)
        except SystemExit:  # argparse has printed what is wrong
            problems.append(f"arguments for `cpmtp train`: {shlex.join(train_args)}")
        except ConfigError as err:
            where = f" (world_size = --nodes {args.nodes} x {tasks} tasks per node)"
            problems += [p + where if "world_size" in p else p for p in err.problems]
    if problems:
        raise ValueError("cannot submit:\n  - " + "\n  - ".join(problems))

    params: dict[str, object] = {
        "name": args.job_name or f"cpmtp-{run_dir.name}",
        "nodes": args.nodes,
        "tasks_per_node": tasks,
        "timeout_min": minutes,
        "slurm_signal_delay_s": args.signal_delay,
        "slurm_additional_parameters": {"requeue": True},
    }
    if args.gpus_per_node > 0:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task is not None:
        params["cpus_per_task"] = args.cpus_per_task
    if args.partition is not None:
        params["slurm_partition"] = args.partition
    folder = Path(args.folder).absolute() if args.folder else run_dir / "submitit"
    return params, train_args, folder


def print_estimate(cfg: Config, world_size: int, *, gpus: bool, gpu_memory_gib: float | None) -> None:
    """`cpmtp plan`'s one-line estimate for the job's layout, and a warning when it exceeds the GPUs'
    memory (`--gpu-memory-gib`)."""
    from cpmtp_dist.plan import GIB, estimate, one_line

    est = estimate(cfg, world_size, cuda=gpus)
    print(one_line(est, gpu_memory_gib if gpus else None))
    if gpus and gpu_memory_gib is not None and est.total > gpu_memory_gib * GIB:
        print(
            f"warning: the estimate {est.total / GIB:.1f} GiB per GPU exceeds --gpu-memory-gib {gpu_memory_gib:g}: "
            "`cpmtp plan` lists the layouts that fit"
        )


def submit(args: argparse.Namespace) -> int:
    """The `cpmtp submit` command: check, submit, say where to look."""
    try:
        params, train_args, folder = plan(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    executor = submitit.AutoExecutor(
        folder=folder / "%j", cluster="slurm", slurm_max_num_timeout=args.max_timeouts
    )
    executor.update_parameters(**params)
    job = executor.submit(TrainJob(train_args))
    run_dir = train_args[train_args.index("--run-dir") + 1]
    print(
        f"submitted job {job.job_id}: {params['nodes']} node(s) x {params['tasks_per_node']} task(s), "
        f"{params['timeout_min']} min per run, requeued with --resume auto until done\n"
        f"run directory: {run_dir}\nlogs: {job.paths.folder}/{job.job_id}_<task>_log.out and .err"
    )
    return 0
