"""mosaicml-streaming's MDS format: the one module that imports `streaming`.

`import streaming` runs `streaming/__init__`, which imports `streaming.vision` and with it torchvision. Where the
installed torchvision does not match torch (the only torchvision wheel for a CPU torch 2.13 is a CUDA build), that
import dies with `RuntimeError: operator torchvision::nms does not exist`. This project never uses streaming's
vision datasets, so when (and only when) that import fails that way, an empty module stands in for
`streaming.vision` and the import is retried. Every process that needs streaming gets it through
`import_streaming()`; GPU machines with a matching torchvision never take the fallback.

Shared memory. streaming coordinates the ranks and loader workers of one node through /dev/shm segments and
/tmp file locks named `NNNNNN_<what>`, where NNNNNN is the lowest prefix number no live segment holds. Jobs that
share a node (several runs, an eval beside a training) would then reuse each other's names whenever one starts
while another's segments are briefly absent, and streaming's own `clean_stale_shared_memory()` removes every
such segment on the node, a running job's included: the running job then reads another job's sample order without
a word. So `import_streaming()` puts every name streaming makes into a namespace of this job (`POPE_SHM_NAMESPACE`,
set by the launchers for all processes of one job; by default this process's id, inherited by forked workers),
and `remove_dead_segments()` replaces the node-wide cleaner: it removes only the segments of this user that no
live process has open or mapped.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

TOKENS_COLUMN = "tokens"
DEFAULT_SHARD_BYTES = 1 << 26  # 64 MiB: streaming's default, large enough for fast sequential reads
SHM_NAMESPACE_ENV = "POPE_SHM_NAMESPACE"
SHM_DIR = Path("/dev/shm")
# streaming's names: an optional namespace of ours, the six-digit prefix, then what the segment or lock is for
_SEGMENT = re.compile(r"^(?:[A-Za-z0-9.]+_)?\d{6}_(locals|barrier|next_epoch|cache_usage|shard_states|"
                      r"shard_access_times|resume|epoch_shape|epoch_data)$")
_FILELOCK = re.compile(r"^((?:[A-Za-z0-9.]+_)?\d{6})_(barrier|cache)_filelock$")


def import_streaming() -> Any:
    """`import streaming`, standing in an empty `streaming.vision` where torchvision cannot load."""
    if "streaming" in sys.modules and hasattr(sys.modules["streaming"], "MDSWriter"):
        return sys.modules["streaming"]
    try:
        import streaming
    except RuntimeError as err:
        if "torchvision" not in str(err):
            raise
        for name in [n for n in sys.modules if n == "streaming" or n.startswith("streaming.")]:
            del sys.modules[name]
        sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")
        import streaming
    _namespace_shared_memory()
    return streaming


def shm_namespace() -> str:
    """This job's namespace for streaming's shared memory; fixed at first use, inherited by child processes.

    POPE_SHM_NAMESPACE when a launcher set it; else, in a process group started by another launcher (torchrun,
    srun), the rendezvous address, which all ranks share and no other running job has; else this process's id."""
    if not os.environ.get(SHM_NAMESPACE_ENV):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("MASTER_PORT"):
            where = f"{os.environ.get('MASTER_ADDR', '')}.{os.environ['MASTER_PORT']}"
            os.environ[SHM_NAMESPACE_ENV] = "m" + "".join(c if c.isalnum() else "." for c in where)[-60:]
        else:
            os.environ[SHM_NAMESPACE_ENV] = f"p{os.getpid()}"
    namespace = os.environ[SHM_NAMESPACE_ENV]
    if not re.fullmatch(r"[A-Za-z0-9.]{1,64}", namespace):
        raise ValueError(f"{SHM_NAMESPACE_ENV}={namespace!r}: use 1-64 letters, digits or dots")
    return namespace


def _namespace_shared_memory() -> None:
    """Make streaming name its segments and locks `<namespace>_NNNNNN_<what>` (see the module docstring).

    streaming builds every such name with `streaming.base.shared.prefix._get_path`, which its dataset module
    imports by name: both references are replaced. A streaming without that function is refused rather than run
    unprotected."""
    prefix_module = sys.modules.get("streaming.base.shared.prefix")
    dataset_module = sys.modules.get("streaming.base.dataset")
    modules = [m for m in (prefix_module, dataset_module) if m is not None and hasattr(m, "_get_path")]
    if len(modules) != 2:
        raise RuntimeError("this mosaicml-streaming names its shared memory differently than pope-pretrain "
                           "expects (streaming.base.shared.prefix._get_path); install mosaicml-streaming 0.9-0.13")
    if getattr(prefix_module._get_path, "pope_namespaced", False):
        return
    namespace = shm_namespace()

    def namespaced_path(prefix_int: int, name: str) -> str:
        return f"{namespace}_{prefix_int:06}_{name}"

    namespaced_path.pope_namespaced = True  # type: ignore[attr-defined]
    for module in modules:
        module._get_path = namespaced_path


def _paths_in_use() -> set[str]:
    """Files that some process readable by us has open or mapped (/proc/PID/fd and /proc/PID/maps)."""
    used: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    used.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    continue
            with open(f"/proc/{pid}/maps") as maps:
                used.update(line.split(None, 5)[5].strip() for line in maps if line.count(" ") >= 5 and "/" in line)
        except OSError:  # gone meanwhile, or another user's process (whose segments we could not remove anyway)
            continue
    return used


def remove_dead_segments() -> list[str]:
    """Remove streaming's shared-memory segments and file locks left by dead processes; return their names.

    Only files of this user that no live process has open or mapped are removed: a segment a running job uses is
    always mapped by it, so jobs on one node never touch each other's. A lock file is removed only when no
    segment of its prefix exists any more. Linux only (/proc); elsewhere nothing is removed.
    """
    if not Path("/proc/self/maps").exists() or not SHM_DIR.is_dir():
        return []
    used, uid, removed = _paths_in_use(), os.getuid(), []
    live_prefixes = set()
    for entry in os.scandir(SHM_DIR):
        match = _SEGMENT.match(entry.name)
        if not match:
            continue
        try:
            mine = entry.stat(follow_symlinks=False).st_uid == uid
        except OSError:
            continue
        if mine and entry.path not in used:
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
                continue
            except OSError:
                pass
        live_prefixes.add(entry.name[: entry.name.rindex("_" + match.group(1))])
    lock_dir = Path(tempfile.gettempdir())
    for entry in os.scandir(lock_dir):
        match = _FILELOCK.match(entry.name)
        if match and match.group(1) not in live_prefixes and entry.path not in used:
            try:
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    os.unlink(entry.path)
                    removed.append(entry.name)
            except OSError:
                continue
    return removed


def token_encoding(dtype: np.dtype) -> str:
    """The MDS column encoding for a 1-D token array of this dtype."""
    return f"ndarray:{np.dtype(dtype).name}"


def open_writer(out: Path, dtype: np.dtype, compression: str | None = None,
                size_limit: int = DEFAULT_SHARD_BYTES) -> Any:
    """An MDSWriter with the single column `tokens` (1-D array of `dtype`)."""
    streaming = import_streaming()
    return streaming.MDSWriter(out=str(out), columns={TOKENS_COLUMN: token_encoding(dtype)},
                               compression=compression, size_limit=size_limit, progress_bar=False)


def read_split(split_dir: Path) -> Iterator[np.ndarray]:
    """Every sample of an MDS dataset folder, in order (no shuffling, no shared memory)."""
    streaming = import_streaming()
    dataset = streaming.LocalDataset(local=str(split_dir))
    for index in range(len(dataset)):
        yield dataset[index][TOKENS_COLUMN]


def merge_indexes(split_dir: Path, part_dirs: Sequence[Path]) -> None:
    """Write split_dir/index.json covering the MDS datasets in its subfolders part_dirs (streaming's merge)."""
    streaming_util = import_streaming().base.util
    for part in part_dirs:
        if part.parent.resolve() != split_dir.resolve():
            raise ValueError(f"{part} must be a direct subfolder of {split_dir} to be merged")
    # merge_index announces its temporary folder and the existing output folder as warnings; they are expected.
    loggers = [logging.getLogger(), logging.getLogger("streaming")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        streaming_util.merge_index([str(p / "index.json") for p in part_dirs], str(split_dir), keep_local=True)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
