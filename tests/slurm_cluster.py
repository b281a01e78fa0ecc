"""A real Slurm cluster on this machine, for the Slurm tests: munged, slurmctld and one slurmd per node run
as children of the test process, with every file (key, config, state, spool, logs) in one temporary folder.

    python tests/slurm_cluster.py install        # Debian's Slurm, munge and iproute2 when missing
    python tests/slurm_cluster.py up DIR [N]     # N nodes (default 1) to try things by hand (Ctrl-C stops it)

One node is this host on loopback. N >= 2 nodes are simulated (`NodeNetwork`): each node is a network
namespace with its own address on a private subnet, joined to the others and to the controller by a bridge
in this machine's namespace, and runs its own slurmd (`slurmd -N nN`) and therefore its own job steps;
munge's socket and the files are shared, as on a cluster with a shared file system. A node reaches the
others only through these addresses: the namespaces have no route anywhere else. Killing every process of a
namespace and taking its link down is a lost node (`NodeNetwork.lose`).

The config is built from `slurmd -C` and tuned so that a requeued job starts again within a few seconds
rather than minutes (see `FAST_REQUEUE`).
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

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge", "iproute2"]
BINARIES = [
    "munged",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "scontrol",
    "sinfo",
    "squeue",
    "scancel",
    "ip",
    "nsenter",
]

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


class NodeNetwork:
    """Network namespaces `cpmtp-<tag>-n1..nN` with addresses 10.213.<k>.11.., each joined by a veth pair to
    a bridge holding 10.213.<k>.1 (the controller's address) in this machine's namespace. Inside a node the
    interface is `eth0` (so `GLOO_SOCKET_IFNAME=eth0` fits every node). `close()` kills what still runs in
    the namespaces and deletes them and the bridge; it is safe to call twice and after a partial setup."""

    ifname = "eth0"

    def __init__(self, nodes: int) -> None:
        self.tag = f"{os.getpid() % 100_000}"
        used = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
        free = [k for k in range(1, 255) if f"10.213.{k}." not in used]
        if not free:
            raise RuntimeError("no free 10.213.k.0/24 subnet for the test cluster")
        self.subnet = f"10.213.{free[os.getpid() % len(free)]}"
        self.bridge = f"cpb{self.tag}"
        self.names = [f"n{i}" for i in range(1, nodes + 1)]
        self.addresses = {name: f"{self.subnet}.{10 + i}" for i, name in enumerate(self.names, 1)}
        self.controller = f"{self.subnet}.1"
        self._made: list[str] = []
        try:
            self._up()
        except BaseException:
            self.close()
            raise

    def namespace(self, node: str) -> str:
        return f"cpmtp-{self.tag}-{node}"

    def outer_link(self, node: str) -> str:
        """The bridge's end of `node`'s veth pair, in this machine's namespace."""
        return f"cpv{self.tag}{node}"

    def exec_prefix(self, node: str) -> list[str]:
        """What runs a command on `node`: in its network namespace, and only there (`ip netns exec` would
        also mount a sysfs of its own, without the cgroup file system slurmd needs)."""
        return ["nsenter", f"--net=/run/netns/{self.namespace(node)}"]

    def _ip(self, *args: str) -> None:
        res = subprocess.run(["ip", *args], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")

    def _up(self) -> None:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._made.append("bridge")
        self._ip("addr", "add", f"{self.controller}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for name in self.names:
            ns, outer, inner = self.namespace(name), self.outer_link(name), f"cpp{self.tag}{name}"
            self._ip("netns", "add", ns)
            self._made.append(name)
            self._ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self._ip("link", "set", inner, "netns", ns)
            self._ip("-n", ns, "link", "set", inner, "name", self.ifname)
            self._ip("-n", ns, "addr", "add", f"{self.addresses[name]}/24", "dev", self.ifname)
            self._ip("-n", ns, "link", "set", self.ifname, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("link", "set", outer, "master", self.bridge)
            self._ip("link", "set", outer, "up")

    def pids(self, node: str) -> list[int]:
        res = subprocess.run(["ip", "netns", "pids", self.namespace(node)], capture_output=True, text=True)
        return [int(p) for p in res.stdout.split()]

    def lose(self, node: str) -> None:
        """The node fails: its link goes down (its peers see no goodbye, only silence), then every process
        on it (slurmd, the job step, the ranks) is killed."""
        self._ip("link", "set", self.outer_link(node), "down")
        self._kill(node)

    def _kill(self, node: str) -> None:
        for _ in range(50):  # a process may fork while we kill: until none is left
            pids = self.pids(node)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def close(self) -> None:
        for name in [n for n in self._made if n != "bridge"]:
            self._kill(name)
            subprocess.run(["ip", "netns", "del", self.namespace(name)], capture_output=True)
        if "bridge" in self._made:
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        self._made.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + one slurmd per node in `root`, all nodes in partition `debug`: this host alone
    on loopback (`nodes=1`), or `nodes` simulated ones (`NodeNetwork`, needs root).

    `env` is the environment for client commands (`SLURM_CONF`). Use as a context manager, or call
    `start()` and `stop()`."""

    partition = "debug"
    slurmd_timeout = 10
    """Seconds without an answer after which slurmctld marks a node DOWN (default 300)."""

    def __init__(self, root: Path, nodes: int = 1) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.nodes = nodes
        self.net: NodeNetwork | None = None
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: list[subprocess.Popen] = []
        if nodes == 1:
            self.names = [socket.gethostname().split(".")[0]]  # Slurm names hosts by their short name
            self.addresses = {self.names[0]: "127.0.0.1"}

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
            if self.nodes > 1:
                self.net = NodeNetwork(self.nodes)
                self.names, self.addresses = self.net.names, self.net.addresses
            for node in self.names:
                (self.root / "spool" / node).mkdir(exist_ok=True)
            self._start_munged()
            self.conf.write_text(self._config())
            # -D: stay in the foreground, so that stop() ends exactly the processes started here.
            self._spawn([binary("slurmctld"), "-D", "-f", str(self.conf)], "slurmctld.out")
            for node in self.names:
                cmd = [*self.on_node(node), binary("slurmd"), "-D", "-f", str(self.conf), "-N", node]
                self._spawn(cmd, f"slurmd.{node}.out")
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise

    def on_node(self, node: str) -> list[str]:
        """The prefix that runs a command on `node`."""
        return self.net.exec_prefix(node) if self.net else []

    def lose(self, node: str) -> None:
        """Node `node` fails (simulated nodes only): see `NodeNetwork.lose`."""
        assert self.net is not None, "a lost node needs simulated nodes (nodes >= 2)"
        self.net.lose(node)

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
        host = socket.gethostname().split(".")[0]
        controller = self.net.controller if self.net else "127.0.0.1"
        node = subprocess.run(
            [binary("slurmd"), "-C"], capture_output=True, text=True, check=True
        ).stdout.splitlines()[0]
        node = " ".join(f for f in node.split() if not f.startswith("NodeName="))  # CPUs, sockets, memory
        r, fast = self.root, FAST_REQUEUE
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={self.addresses[n]} {node} State=UNKNOWN" for n in self.names
        )
        return f"""\
ClusterName=cpmtptest
SlurmctldHost={host}({controller})
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
SlurmdTimeout={self.slurmd_timeout}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool" / "%n"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmdPidFile={r / "slurmd.%n.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmdLogFile={r / "log" / "slurmd.%n.log"}
{nodes}
PartitionName={self.partition} Nodes={",".join(self.names)} Default=YES MaxTime=INFINITE State=UP
"""

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {self.logs()}")
            res = subprocess.run(
                ["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True
            )
            state = " ".join(res.stdout.split())
            if res.returncode == 0 and state == " ".join(["idle"] * self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the nodes are not idle after {timeout:.0f} s (sinfo: {state!r}): {self.logs()}")

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
        return "".join(
            self._tail(name) for name in ("slurmctld.log", *(f"slurmd.{n}.log" for n in self.names))
        )

    def _tail(self, name: str, chars: int = 3000) -> str:
        path = self.root / "log" / name
        return f"\n--- {name} ---\n{path.read_text(errors='replace')[-chars:]}" if path.exists() else ""

    # -- stopping -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel what is left in the queue, then end the daemons (the newest first)."""
        if len(self._procs) > 1 and all(p.poll() is None for p in self._procs[:2]):  # munged, slurmctld
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
        if self.net is not None:
            self.net.close()  # and whatever a job left running on the nodes


def main(argv: list[str]) -> int:
    if argv[:1] == ["install"]:
        return install()
    if argv[:1] == ["up"] and len(argv) in (2, 3):
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the cluster as Ctrl-C does
        with SlurmCluster(Path(argv[1]).resolve(), nodes=int(argv[2]) if len(argv) == 3 else 1) as cluster:
            for node in cluster.names:
                print(f"node {node}: {cluster.addresses[node]}; run there: {' '.join(cluster.on_node(node))}")
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
