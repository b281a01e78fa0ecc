"""`cpmtp train --nproc-per-node N`: N ranks on this machine from the same command (torchrun, in-process).

The command runs itself again under torch's elastic launcher (`torch.distributed.run`, what `torchrun`
runs) with a standalone rendezvous. The launcher stays in this process: a stop signal sent to `cpmtp`
(SIGTERM, or SIGUSR2, which torchrun does not handle and is turned into SIGTERM here) reaches every rank,
which checkpoint and stop; `cpmtp` then exits with status 3 like a single-process run, where torchrun
itself would report 1. A failure of the ranks gives their common status (2: bad input; 4: a non-finite step
stopped training; 5: other ranks were lost), else 1; when they differ, the status of the first to fail.

`python -m launchers.local TORCHRUN_ARGS...` is torchrun with these statuses: what `slurm/train.sbatch` runs
on each node of a job.
"""

from __future__ import annotations

PREEMPTED, BAD_INPUT, NONFINITE, PEERS_LOST = 3, 2, 4, 5
"""The statuses of `cpmtp train` that a launcher passes on as they are (`NONFINITE`:
`cpmtp_dist.training.nonfinite.NONFINITE_EXIT_CODE`, `PEERS_LOST`: `cpmtp_dist.parallel.peers`)."""


def child_argv(argv: list[str], run_dir: str) -> list[str]:
    """The `cpmtp` arguments of each rank: these without `--nproc-per-node`, with the run directory fixed
    (a default one is named after the time, which the ranks must not each choose)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc-per-node":
            skip = True
        elif not arg.startswith("--nproc-per-node="):
            out.append(arg)
    has_run_dir = any(a == "--run-dir" or a.startswith("--run-dir=") for a in out)
    return out if has_run_dir else [*out, "--run-dir", run_dir]


def run_local(nproc: int, argv: list[str]) -> int:
    """Run `cpmtp <argv>` as `nproc` ranks on this machine; the ranks' exit status."""
    return run_torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "launchers.cli", *argv])


def run_torchrun(torchrun_args: list[str]) -> int:
    """torchrun `torchrun_args` in this process; the ranks' exit status (see the module's note)."""
    import os
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    launch = parse_args(torchrun_args)
    signal.signal(signal.SIGUSR2, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    try:
        run(launch)
    except SignalException:  # the launcher passed the signal on and waited for the ranks to stop
        return PREEMPTED
    except ChildFailedError as err:
        # The first rank to fail says why: the launcher then stops the node's other ranks (status -15).
        _, first = err.get_first_failure()
        return first.exitcode if first.exitcode in (PREEMPTED, BAD_INPUT, NONFINITE, PEERS_LOST) else 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(run_torchrun(sys.argv[1:]))
