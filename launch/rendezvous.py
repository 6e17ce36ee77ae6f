"""torch.distributed's rendezvous from the SLURM environment of a task, without ssh or a hostfile.

Every task of a job computes the same answer: the master is the first host of SLURM_JOB_NODELIST, the port is
derived from the job id (so jobs sharing a node do not collide, and a requeued job reuses its own), and
RANK / LOCAL_RANK / WORLD_SIZE / LOCAL_WORLD_SIZE come from SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and the
tasks on this node. Host names that do not resolve (SLURM node names that are not DNS names, e.g. several emulated
nodes on one machine) are looked up in SLURM itself (`scontrol show node`, NodeAddr).
"""

from __future__ import annotations

import re
import socket
import subprocess
from typing import Mapping

PORT_BASE, PORT_SPAN = 20000, 20000


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list → host names: `gpu[01-04]`, `a1,b[2-3]`, `r[1-2]n[01-02]` (padding kept)."""
    return [host for group in _split_top_level(nodelist.strip()) if group for host in _expand_name(group)]


def _expand_name(name: str) -> list[str]:
    """Expand the first bracket group of one name, then the rest of it recursively."""
    match = re.match(r"([^\[]*)\[([^\]]+)\](.*)$", name)
    if not match:
        return [name]
    prefix, ranges, rest = match.groups()
    values: list[str] = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"cannot read the node range [{ranges}] in {name!r}")
        values += [f"{i:0{len(low)}d}" for i in range(int(low), int(high or low) + 1)]
    return [host for value in values for host in _expand_name(prefix + value + rest)]


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """SLURM_TASKS_PER_NODE (`2(x3),1`) → the number of tasks on node `node_id`."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise ValueError(f"cannot read SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts[node_id]


def port_for_job(job_id: str) -> int:
    digits = re.sub(r"\D", "", job_id.split("_")[0]) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def resolve(host: str) -> str:
    """An address for a SLURM node name: DNS first, else SLURM's NodeAddr."""
    try:
        return socket.gethostbyname(host)
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    match = re.search(r"NodeAddr=(\S+)", out)
    if not match:
        raise ValueError(f"cannot resolve SLURM node {host!r} (no DNS entry, no NodeAddr from scontrol)")
    return match.group(1)


def rendezvous_from_env(env: Mapping[str, str], resolver=resolve) -> dict[str, str]:
    """The torch.distributed variables for this task, from its SLURM variables."""
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_PROCID", "SLURM_NTASKS") if k not in env]
    if missing:
        raise ValueError(f"not inside a SLURM task: {', '.join(missing)} unset")
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    world = int(env["SLURM_NTASKS"])
    rank = int(env["SLURM_PROCID"])
    node_id = int(env.get("SLURM_NODEID", 0))
    local_rank = int(env.get("SLURM_LOCALID", 0))
    local_world = tasks_on_node(env["SLURM_TASKS_PER_NODE"], node_id) if "SLURM_TASKS_PER_NODE" in env else world
    addresses = {resolver(h) for h in hosts} if len(hosts) > 1 else set()
    if len(addresses) == 1:
        # Several SLURM nodes on one machine (emulated nodes): one node as far as shared memory is concerned, or
        # streaming's per-node leaders collide in /dev/shm.
        local_rank, local_world = rank, world
    return {"MASTER_ADDR": resolver(hosts[0]), "MASTER_PORT": str(port_for_job(env["SLURM_JOB_ID"])),
            "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(local_world)}
