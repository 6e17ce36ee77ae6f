"""Child processes that never outlive their parent.

A pool worker or a data-loader worker whose parent was SIGKILLed is re-parented to PID 1 and, if it is blocked
(a full queue, a shared-memory barrier), keeps its cores and memory for good. Linux can deliver a signal to a
child when its parent dies (prctl PR_SET_PDEATHSIG); SIGKILL is used, since a child blocked in a barrier never
acts on a signal it could catch. Every process this project forks or spawns calls `die_with_parent` first.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have Linux SIGKILL this process when its parent exits; exit now if the parent is already gone.

    `parent_pid`: the process expected as parent (the check closes the race of a parent that died before the
    request was made). Elsewhere than Linux this does nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return  # not Linux (glibc): children may outlive a killed parent there
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def loader_worker_init(parent_pid: int | None, worker_id: int) -> None:
    """`worker_init_fn` of the training and evaluation data loaders (use with functools.partial)."""
    die_with_parent(parent_pid)
