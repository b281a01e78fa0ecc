"""A real one-node Slurm cluster on loopback, for the Slurm tests: munged, slurmctld and slurmd run as
children of the test process, with every file (key, config, state, spool, logs) in one temporary folder.

    python tests/slurm_cluster.py install   # Debian's slurmctld, slurmd, slurm-client, munge when missing
    python tests/slurm_cluster.py up DIR    # a cluster for trying things by hand (Ctrl-C stops it)

The config is built from `hostname` and `slurmd -C` and tuned so that a requeued job starts again within a
few seconds rather than minutes (see `FAST_REQUEUE`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel"]

FAST_REQUEUE = {
    # A requeued job may start again only after its step credentials expired: 120 s by default.
    "cred_expire": 5,
    # SIGTERM -> SIGKILL grace when a job ends or is requeued (default 30 s).
    "KillWait": 5,
    # Completed job records are kept this long (default 300 s); small keeps squeue short.
    "MinJobAge": 10,
    # The periodic scheduling pass (default 60 s) starts a requeued job once its begin time has passed.
    "SchedulerParameters": "sched_interval=1,sched_min_interval=100000",
}


def binary(name: str) -> str | None:
    """The path of a Slurm or munge program; the daemons live in /usr/sbin, which a PATH may leave out."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if binary(b) is None]


def install() -> int:
    """Install Slurm and munge from Debian's packages when a binary is missing (needs root and apt-get);
    otherwise say why the Slurm tests will be skipped. Always exits 0 when nothing could be done, so that
    `make test` still runs everything else on machines without root."""
    if not missing_binaries():
        return 0
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(
            f"slurm: {', '.join(missing_binaries())} missing and no root apt-get: the Slurm tests will skip"
        )
        return 0
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", *PACKAGES]
    if subprocess.run(cmd, env=env).returncode != 0:  # a fresh machine may hold no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)
    return 0 if not missing_binaries() else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd in `root`, one node (this host) in partition `debug`.

    `env` is the environment for client commands (`SLURM_CONF`). Use as a context manager, or call
    `start()` and `stop()`."""

    partition = "debug"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]  # Slurm names hosts by their short name
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- starting -------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munged()
            self.conf.write_text(self._config())
            for daemon in ("slurmctld", "slurmd"):
                # -D: stay in the foreground, so that stop() ends exactly the processes started here.
                node = ["-N", self.node] if daemon == "slurmd" else []
                self._spawn([binary(daemon), "-D", "-f", str(self.conf), *node], f"{daemon}.out")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        with (self.root / "log" / log_name).open("w") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        self._procs.append(proc)
        return proc

    def _start_munged(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self.munge_socket = self.root / "munge" / "munge.socket"
        # --force: run as root, as the test does (the packaged service runs as user munge).
        proc = self._spawn(
            [binary("munged"), "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--seed-file={self.root / 'munge' / 'seed'}",
             f"--log-file={self.root / 'log' / 'munged.log'}"],
            "munged.out",
        )  # fmt: skip
        deadline = time.time() + 10
        while not self.munge_socket.exists():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    f"munged did not start: {self._tail('munged.out')}{self._tail('munged.log')}"
                )
            time.sleep(0.05)

    def _config(self) -> str:
        host = self.node
        node = subprocess.run(
            [binary("slurmd"), "-C"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        node = " ".join(f for f in node.split() if not f.startswith("NodeName="))  # CPUs, sockets, memory
        r, fast = self.root, FAST_REQUEUE
        return f"""\
ClusterName=cpmtptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire={fast["cred_expire"]}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
SchedulerType=sched/builtin
SchedulerParameters={fast["SchedulerParameters"]}
KillWait={fast["KillWait"]}
MinJobAge={fast["MinJobAge"]}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.log"}
NodeName={host} NodeAddr=127.0.0.1 {node} State=UNKNOWN
PartitionName={self.partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {self.logs()}")
            res = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            state = res.stdout.strip()
            if res.returncode == 0 and state == "idle":
                return
            time.sleep(0.2)
        raise RuntimeError(f"the node is not idle after {timeout:.0f} s (sinfo: {state!r}): {self.logs()}")

    # -- using --------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A client command (`sbatch`, `scancel`, ...) against this cluster."""
        kw.setdefault("env", self.env)
        res = subprocess.run(list(cmd), capture_output=True, text=True, **kw)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {res.returncode}: {res.stdout}{res.stderr}")
        return res

    def jobs(self) -> list[str]:
        """Ids of the jobs still in the queue (pending, running, completing)."""
        return self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()

    def logs(self) -> str:
        return "".join(self._tail(name) for name in ("slurmctld.log", "slurmd.log"))

    def _tail(self, name: str, chars: int = 3000) -> str:
        path = self.root / "log" / name
        return f"\n--- {name} ---\n{path.read_text(errors='replace')[-chars:]}" if path.exists() else ""

    # -- stopping -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel what is left in the queue, then end the daemons (the newest first)."""
        if self._procs and all(p.poll() is None for p in self._procs):
            subprocess.run(
                ["scancel", "--full", "--user", str(os.getuid())], env=self.env, capture_output=True
            )
            deadline = time.time() + 20
            while time.time() < deadline and self.jobs():
                time.sleep(0.2)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()


def main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:
        return install()
    if argv[:1] == ["up"] and len(argv) == 2:
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the cluster as Ctrl-C does
        with SlurmCluster(Path(argv[1]).resolve()) as cluster:
            print(f"export SLURM_CONF={cluster.conf}   # Ctrl-C stops the cluster", flush=True)
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
