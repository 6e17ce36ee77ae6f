"""The local launcher (the default without SLURM): N training processes on this machine.

Like torchrun: each process gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free
MASTER_PORT, and runs `python -m pipeline.train RUN/config.yaml`. When one process fails the others are stopped;
when the launcher dies, so do they (Linux parent-death signal). SIGTERM and SIGUSR2 sent to the launcher are passed
on to every process: the run saves a checkpoint and stops, and the same command later resumes it. Ctrl-C reaches
the whole process group directly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from data_prep.lifetime import die_with_parent
from data_prep.shm import SHM_NAMESPACE_ENV, new_namespace, remove_dead_segments
from pipeline.config import Config
from pipeline.run import prepare_run_dir
from pipeline.stopping import EXIT_STOPPED

GRACE_S = 5.0  # after a rank fails, how long the others get to fail by themselves before they are killed


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(rank: int, nproc: int, port: int, namespace: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    # One shared-memory namespace per job: streaming's segments never meet another job's on this node.
    env[SHM_NAMESPACE_ENV] = namespace
    # Several CPU processes on one machine: share the cores instead of each taking all of them.
    if "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // nproc))
    return env


def launch_local(config: Config, fresh: bool = False, adopt: bool = False) -> int:
    """Run the config's training with launch.nproc processes here; returns the exit code."""
    run = prepare_run_dir(config, fresh, adopt)
    nproc, port = config.launch.nproc, free_port()
    command = [sys.executable, "-m", "pipeline.train", str(run.config)]
    launcher, namespace = os.getpid(), new_namespace("L")
    procs = [subprocess.Popen(command, env=process_env(rank, nproc, port, namespace),
                              preexec_fn=lambda: die_with_parent(launcher)) for rank in range(nproc)]

    def forward(signum: int, frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        return _wait(procs)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        remove_dead_segments()  # what killed ranks left in /dev/shm, and streaming's lock files in /tmp


def _wait(procs: list[subprocess.Popen]) -> int:
    """Wait for all; if one fails, give the others a moment to fail the same way, then stop them."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if all(c is not None for c in codes):  # a real failure wins over "stopped, resume me" (75)
            return next((c for c in codes if c not in (0, EXIT_STOPPED)), next((c for c in codes if c), 0))
        crashed = [c for c in failed if c != EXIT_STOPPED]
        if crashed:
            deadline = time.monotonic() + GRACE_S
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                time.sleep(0.1)
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()  # a peer stuck in a collective with a dead rank never returns by itself
                proc.wait()
            return crashed[0]
        time.sleep(0.1)
