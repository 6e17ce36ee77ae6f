"""The process group: set up from the environment the launchers export, plus the few collectives the loop needs.

Both launchers (launch/local.py, launch/slurm.py) export the usual torch.distributed variables (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and start the same `pipeline.train.main`. Without them,
this is a single process. Backend "auto" is NCCL when the process has a GPU, gloo otherwise.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
from typing import Any

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_from_os() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from the environment; a single process by default."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return rank, world, local_rank, local_world


def init(backend: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Initialise the process group through DeepSpeed and pick this process's device."""
    rank, world, local_rank, local_world = env_from_os()
    cuda = torch.cuda.is_available()
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise ValueError("launch.backend=nccl needs GPUs; this process has none (use gloo or auto)")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    for key, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank),
                       ("LOCAL_WORLD_SIZE", local_world)):
        os.environ[key] = str(value)
    import deepspeed

    if not cuda:
        _skip_cpu_shm_op()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(minutes=timeout_minutes), rank=rank, world_size=world)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return DistEnv(rank, world, local_rank, local_world, device, backend)


def _skip_cpu_shm_op() -> None:
    """Don't build DeepSpeed's shared-memory all-reduce extension on CPU.

    On CPU every process group set-up JIT-compiles `deepspeed_shm_comm` (~45 s the first time on a machine) and
    leaves segments in /dev/shm; gloo's own all-reduce is what we use. The builder lives in the module
    `deepspeed.comm.torch` (whose attribute access `deepspeed.comm.torch` is shadowed by the torch package).
    """
    import deepspeed.comm  # noqa: F401 - loads deepspeed.comm.torch

    module = sys.modules.get("deepspeed.comm.torch")
    if module is not None and hasattr(module, "build_shm_op"):
        module.build_shm_op = lambda: None


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few floats over all processes (float64, so sums of losses stay exact enough to compare)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    if env.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast(value: object, env: DistEnv, group: Any = None) -> object:
    """Rank 0's (picklable, small) value on every rank (over `group`, by default all processes)."""
    if env.world_size == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, group=group)
    return holder[0]


def waiting_group(env: DistEnv, hours: float) -> Any:
    """A gloo group of all processes whose operations time out after `hours`, for the others to wait on rank 0's
    long work (a checkpoint conversion) in; collective. None with one process."""
    if env.world_size == 1:
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=hours))


def all_gather(value: object, env: DistEnv) -> list:
    """Every rank's (picklable, small) value, in rank order, on every rank."""
    if env.world_size == 1:
        return [value]
    gathered: list = [None] * env.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
