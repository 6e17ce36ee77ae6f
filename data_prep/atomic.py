"""Writing a file so that no reader ever sees half of it: the one helper for every such write in data_prep."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace `path` with `data` (text is written as UTF-8) so that it holds the old content or all of the new.

    Guarantee: the bytes go to a hidden sibling `.NAME.tmp-PID` (the same folder, so the same file system), which
    is flushed and fsynced before `os.replace` renames it over `path`. A reader, or a process killed at any point,
    sees the old file or the complete new one; on an error the sibling is removed and `path` is left as it was.
    The folder is not fsynced: after a power loss the rename itself may be lost (the old file comes back, never a
    partial new one).
    The PID in the name keeps concurrent writers of one path (array tasks, ranks) from sharing a temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a kill: leave no half-written temporary behind
        tmp.unlink(missing_ok=True)
        raise
