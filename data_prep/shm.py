"""streaming's shared memory, one namespace per job, and a cleaner that removes only what dead jobs left.

streaming coordinates the ranks and loader workers of one node through /dev/shm segments and /tmp lock files named
`NNNNNN_<what>`, NNNNNN being the lowest number no live segment holds, and it looks some of them up by name later
(the resume state at each new iterator, each epoch's sample order). Its own `clean_stale_shared_memory()` removes
every such segment on the node. A second job starting beside a running one therefore took over the first one's
names, and the first then read the second's resume state at its next epoch: its data order changed without a word.

Here:
- `namespace_shared_memory()` (called by data_prep/mds.py on import) makes streaming name everything
  `<namespace>_NNNNNN_<what>`, the namespace being this job's (`POPE_SHM_NAMESPACE`, set by the launchers for all
  processes of a job; see `shm_namespace`), and takes a shared `flock` on `/dev/shm/pope-<namespace>.lock` that the
  process and its forked workers hold until they exit: the proof that the job is alive, valid across PID
  namespaces (containers sharing /dev/shm) where /proc cannot see the other job's processes.
- `remove_dead_segments()` removes a namespace's segments, locks and lock files only once it can take that lock
  exclusively (every process of the job is gone). Segments without a pope namespace (another program's streaming)
  are removed only when they are older than a minute and no process visible in /proc has them open or mapped.
Only files of this user are touched.
"""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path

SHM_NAMESPACE_ENV = "POPE_SHM_NAMESPACE"
SHM_DIR = Path("/dev/shm")
LOCK_PREFIX = "pope-"
UNOWNED_MIN_AGE_S = 60.0  # a segment of another program younger than this may be being set up: left alone
_SEGMENT = re.compile(r"^(?:([A-Za-z0-9.]+)_)?(\d{6})_(locals|barrier|next_epoch|cache_usage|shard_states|"
                      r"shard_access_times|resume|epoch_shape|epoch_data)$")
_FILELOCK = re.compile(r"^(?:([A-Za-z0-9.]+)_)?(\d{6})_(barrier|cache)_filelock$")
_held: dict[str, int] = {}  # namespace → the fd of its lock file, held for the life of the process


def _token(text: str, limit: int = 60) -> str:
    return "".join(c if c.isalnum() else "." for c in text)[-limit:]


def new_namespace(kind: str) -> str:
    """A fresh namespace for a job a launcher starts here: `kind`, this host, this pid, random bits."""
    return f"{kind}{_token(socket.gethostname(), 20)}.{os.getpid()}.{secrets.token_hex(4)}"


def shm_namespace() -> str:
    """This job's namespace; fixed at first use and inherited by child processes.

    POPE_SHM_NAMESPACE when a launcher set it; else, in a process group started by another launcher (torchrun,
    srun), the host and rendezvous address, which all local ranks share; else this process alone."""
    if not os.environ.get(SHM_NAMESPACE_ENV):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("MASTER_PORT"):
            where = f"{socket.gethostname()}.{os.environ.get('MASTER_ADDR', '')}.{os.environ['MASTER_PORT']}"
            os.environ[SHM_NAMESPACE_ENV] = "m" + _token(where)
        else:
            os.environ[SHM_NAMESPACE_ENV] = new_namespace("p")
    namespace = os.environ[SHM_NAMESPACE_ENV]
    if not re.fullmatch(r"[A-Za-z0-9.]{1,80}", namespace):
        raise ValueError(f"{SHM_NAMESPACE_ENV}={namespace!r}: use 1-80 letters, digits or dots")
    return namespace


def _hold_lock(namespace: str) -> None:
    """Take (once per process) a shared flock on the namespace's lock file; forked children share it."""
    if namespace in _held or not SHM_DIR.is_dir():
        return
    path = SHM_DIR / f"{LOCK_PREFIX}{namespace}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not removed by a cleaner between our open and our lock
            _held[namespace] = fd
            atexit.register(_release, namespace, os.getpid())
            return
        os.close(fd)


def _release(namespace: str, pid: int) -> None:
    """At exit of the process that took the lock: remove the lock file if no process of the job holds it any
    more and no segment of the namespace is left (streaming unlinks its own on a clean exit)."""
    if os.getpid() != pid or namespace not in _held:
        return  # a forked child inherits atexit handlers; only the taker cleans up
    os.close(_held.pop(namespace))
    dead, fd = _namespace_dead(namespace, os.getuid())
    if dead:
        try:
            if not any(SHM_DIR.glob(f"{namespace}_*")):
                for lock in Path(tempfile.gettempdir()).glob(f"{namespace}_*_filelock"):
                    _unlink(str(lock), lock.name)
                _unlink(str(SHM_DIR / f"{LOCK_PREFIX}{namespace}.lock"), namespace)
        finally:
            os.close(fd)


def namespace_shared_memory() -> None:
    """Make streaming name its segments and locks `<namespace>_NNNNNN_<what>`, and hold the namespace's lock.

    streaming builds every such name with `streaming.base.shared.prefix._get_path`, which its dataset module
    imports by name: both references are replaced. A streaming without that function is refused rather than run
    unprotected."""
    prefix_module = sys.modules.get("streaming.base.shared.prefix")
    dataset_module = sys.modules.get("streaming.base.dataset")
    modules = [m for m in (prefix_module, dataset_module) if m is not None and hasattr(m, "_get_path")]
    if len(modules) != 2:
        raise RuntimeError("this mosaicml-streaming names its shared memory differently than pope-pretrain "
                           "expects (streaming.base.shared.prefix._get_path); install mosaicml-streaming 0.9-0.13")
    namespace = shm_namespace()
    _hold_lock(namespace)
    if getattr(prefix_module._get_path, "pope_namespace", None) == namespace:
        return

    def namespaced_path(prefix_int: int, name: str) -> str:
        return f"{namespace}_{prefix_int:06}_{name}"

    namespaced_path.pope_namespace = namespace  # type: ignore[attr-defined]
    for module in modules:
        module._get_path = namespaced_path


def _inodes_in_use(device: int) -> set[int]:
    """Inodes on `device` that a process visible to us has open or mapped (/proc/PID/fd and /proc/PID/maps)."""
    used: set[int] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    stat = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if stat.st_dev == device:
                    used.add(stat.st_ino)
            with open(f"/proc/{pid}/maps") as maps:
                for line in maps:
                    fields = line.split(None, 5)
                    if len(fields) == 6 and fields[5].startswith(str(SHM_DIR)):
                        used.add(int(fields[4]))
        except OSError:  # gone meanwhile, or another user's process (whose segments we could not remove anyway)
            continue
    return used


def _namespace_dead(namespace: str, uid: int) -> tuple[bool, int | None]:
    """(dead, fd holding its lock exclusively) when every process of `namespace` is gone; (False, None) if any
    lives; (False, None) also when it has no lock file (not ours to judge by the lock)."""
    path = SHM_DIR / f"{LOCK_PREFIX}{namespace}.lock"
    try:
        if path.stat().st_uid != uid:
            return False, None
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False, None
    return True, fd


def remove_dead_segments() -> list[str]:
    """Remove streaming's segments, lock files and our namespace locks left by dead jobs; return their names.

    Linux only (/proc, /dev/shm); elsewhere nothing is removed."""
    if not SHM_DIR.is_dir() or not Path("/proc/self/maps").exists():
        return []
    uid, now, removed = os.getuid(), time.time(), []
    segments: dict[str | None, list[os.DirEntry]] = {}
    for entry in os.scandir(SHM_DIR):  # listed before anything else is read: a segment made later is not seen
        match = _SEGMENT.match(entry.name)
        try:
            mine = match is not None and entry.stat(follow_symlinks=False).st_uid == uid
        except OSError:
            continue
        if mine:
            namespace = match.group(1)
            segments.setdefault(namespace if namespace and _is_pope(namespace) else None, []).append(entry)
    dead_namespaces: set[str] = set()
    for namespace in sorted(n for n in segments if n is not None):
        dead, fd = _namespace_dead(namespace, uid)
        if dead:
            try:
                for entry in segments[namespace]:
                    removed += _unlink(entry.path, entry.name)
                dead_namespaces.add(namespace)
            finally:
                os.close(fd)
    if segments.get(None):
        used = _inodes_in_use(os.stat(SHM_DIR).st_dev)
        for entry in segments[None]:
            try:
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.st_ino not in used and now - stat.st_ctime > UNOWNED_MIN_AGE_S:
                removed += _unlink(entry.path, entry.name)
    for entry in os.scandir(SHM_DIR):  # lock files of namespaces whose processes are all gone
        if entry.name.startswith(LOCK_PREFIX) and entry.name.endswith(".lock"):
            namespace = entry.name[len(LOCK_PREFIX):-len(".lock")]
            dead, fd = _namespace_dead(namespace, uid)
            if dead:
                dead_namespaces.add(namespace)
                try:
                    if not any(SHM_DIR.glob(f"{namespace}_*")):
                        removed += _unlink(entry.path, entry.name)
                finally:
                    os.close(fd)
    for entry in os.scandir(tempfile.gettempdir()):  # streaming's file locks of dead namespaces
        match = _FILELOCK.match(entry.name)
        namespace = match.group(1) if match else None
        # A namespace's lock file exists before any of its segments or file locks and is removed only once all its
        # processes are gone: file locks of a namespace with neither lock file nor segment are left by dead jobs.
        orphaned = namespace is not None and namespace[:1] in ("L", "S", "Q", "p", "m") and \
            not (SHM_DIR / f"{LOCK_PREFIX}{namespace}.lock").exists() and not any(SHM_DIR.glob(f"{namespace}_*"))
        if match and (namespace in dead_namespaces or orphaned):
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    removed += _unlink(entry.path, entry.name)
            except OSError:
                continue
    return removed


def _is_pope(namespace: str) -> bool:
    return namespace[:1] in ("L", "S", "Q", "p", "m") and (SHM_DIR / f"{LOCK_PREFIX}{namespace}.lock").exists()


def _unlink(path: str, name: str) -> list[str]:
    try:
        os.unlink(path)
        return [name]
    except OSError:
        return []
