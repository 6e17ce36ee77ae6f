"""A real SLURM cluster on this machine for the tests: munged, slurmctld and two emulated nodes on loopback.

Debian's slurm-wlm runs several slurmd daemons on one host: nodes n1 and n2 (2 CPUs each) share this machine,
with NodeAddr 127.0.0.1 and ports 17001-17002. The configuration, state, spool and logs live in a fresh folder per
test session (job ids then restart at 1, and no stale job from an earlier session delays the start); the tools
find it through the SLURM_CONF environment variable, so /etc/slurm is never touched.

    python tests/slurm_cluster.py DIR     # start one by hand (Ctrl-C stops it)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def install_reason() -> str | None:
    """Install SLURM and munge when missing (needs root and Debian's apt); None when ready, else why not."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "SLURM is not installed and cannot be installed here (needs root and apt-get)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            return f"installing SLURM failed: {' '.join(command)}: {proc.stderr.strip()[-300:]}"
    return None


class SlurmCluster:
    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2) -> None:
        self.root, self.nodes, self.cpus = Path(root), nodes, cpus
        self.conf = self.root / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.started_munge = False
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        r = self.root
        self.conf.write_text(f"""ClusterName=popetest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=n[1-{self.nodes}] NodeHostname={self.host} NodeAddr=127.0.0.1 Port=[17001-{17000 + self.nodes}] CPUs={self.cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    def _run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, check=check, timeout=timeout)

    def start(self) -> None:
        self.write_conf()
        if self._run("munge", "-n", check=False).returncode != 0:
            Path("/run/munge").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            self._run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
            self.started_munge = True
            self._wait(lambda: self._run("munge", "-n", check=False).returncode == 0, "munged", 20)
        self._run("slurmctld")
        for index in range(1, self.nodes + 1):
            self._run("slurmd", "-N", f"n{index}")
        self._wait(self.idle, "the nodes to be idle", 60)

    def idle(self) -> bool:
        out = self._run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout.split()
        return len(out) == self.nodes and all(state == "idle" for state in out)

    def queue_empty(self) -> bool:
        return self._run("squeue", "-h", check=False).stdout.strip() == ""

    def stop(self) -> None:
        try:
            if not self._wait(self.queue_empty, "an empty queue", 60, fail=False):
                self._run("scancel", "--full", "-u", "root", check=False)
                self._wait(self.queue_empty, "an empty queue after scancel", 30, fail=False)
            self._run("scontrol", "shutdown", check=False)
            pids = [self.root / "slurmctld.pid"] + [self.root / f"slurmd.n{i}.pid" for i in range(1, self.nodes + 1)]
            self._wait(lambda: not any(_alive(p) for p in pids), "the daemons to exit", 30, fail=False)
            for pid_file in pids:
                if _alive(pid_file):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
        finally:
            if self.started_munge and Path("/run/munge/munged.pid").exists():
                try:
                    os.kill(int(Path("/run/munge/munged.pid").read_text()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass

    @staticmethod
    def _wait(condition, what: str, timeout: float, fail: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.25)
        if fail:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        return False


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return False


if __name__ == "__main__":
    reason = install_reason()
    if reason:
        sys.exit(reason)
    cluster = SlurmCluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/pope-slurm"))
    cluster.start()
    print(f"SLURM up: export SLURM_CONF={cluster.conf}   (Ctrl-C to stop)")
    try:
        signal.pause()
    finally:
        cluster.stop()


@contextlib.contextmanager
def running_cluster(folder: Path):
    """A started SlurmCluster in `folder` with SLURM_CONF pointing at it; stopped and SLURM_CONF restored after."""
    cluster = SlurmCluster(folder)
    cluster.start()
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        try:
            cluster.stop()
        finally:
            if previous is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous
