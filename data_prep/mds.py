"""mosaicml-streaming's MDS format: the one module that imports `streaming`.

`import streaming` runs `streaming/__init__`, which imports `streaming.vision` and with it torchvision. Where the
installed torchvision does not match torch (the only torchvision wheel for a CPU torch 2.13 is a CUDA build), that
import dies with `RuntimeError: operator torchvision::nms does not exist`. This project never uses streaming's
vision datasets, so when (and only when) that import fails that way, an empty module stands in for
`streaming.vision` and the import is retried. Every process that needs streaming gets it through
`import_streaming()`; GPU machines with a matching torchvision never take the fallback. It also puts streaming's
shared memory into a namespace of this job (data_prep/shm.py).
"""

from __future__ import annotations

import logging
import sys
import types
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from data_prep.shm import namespace_shared_memory

TOKENS_COLUMN = "tokens"
DEFAULT_SHARD_BYTES = 1 << 26  # 64 MiB: streaming's default, large enough for fast sequential reads


def import_streaming() -> Any:
    """`import streaming`, standing in an empty `streaming.vision` where torchvision cannot load."""
    if "streaming" in sys.modules and hasattr(sys.modules["streaming"], "MDSWriter"):
        namespace_shared_memory()  # also when something imported streaming before this module did
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
    namespace_shared_memory()
    return streaming


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
