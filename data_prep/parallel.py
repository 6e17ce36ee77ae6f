"""The prep engine shared by every corpus: units of work through a process pool, results written in order.

A corpus module cuts its input into *units* (a file, an archive member, a chromosome, a batch of pieces), each a
small picklable payload, and provides a worker function `unit → UnitResult` (read, clean, tokenize, cut into
samples). The engine runs the workers in a pool with a bounded number of units in flight, and hands the results to
the ShardWriter in input order, so the output does not depend on the number of workers. With one worker it runs in
this process, with no pool at all.

Every worker function gets the tokenizer the same way, from `worker_tokenizer()`: the engine loads it once per
process from the writer's TokenizerInfo and the writer's tokenizer folder, as `load_tokenizer` loads a finished
dataset's, so the workers encode with exactly the tokenizer the manifest records.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np
from tqdm import tqdm

from data_prep.contract import TOKENIZER_DIR
from data_prep.lifetime import die_with_parent
from data_prep.shards import ShardWriter
from data_prep.tokenizers.base import Tokenizer, tokenizer_class

T = TypeVar("T")
_tokenizer: Tokenizer | None = None  # this process's copy of the running prep's tokenizer (see worker_tokenizer)


@dataclasses.dataclass
class PrepOptions:
    """Options every `pope prep <corpus>` takes. None of them changes the output except the shard selection."""

    workers: int = 0  # 0: one per core
    shard_index: int = 0
    num_shards: int = 1
    overwrite: bool = False
    max_skip_fraction: float = 0.01
    compression: str | None = None  # MDS shard compression (None, "zstd", ...)
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"--shard-index must be in [0, --num-shards={self.num_shards}); got {self.shard_index}")
        if not 0.0 <= self.max_skip_fraction <= 1.0:
            raise ValueError(f"--max-skip-fraction must be in [0, 1]; got {self.max_skip_fraction}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0; got {self.workers}")

    @property
    def resolved_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))

    def shard_args(self) -> dict[str, int]:
        """The part of the arguments that selects this shard (recorded in the manifest)."""
        return {"shard_index": self.shard_index, "num_shards": self.num_shards}


@dataclasses.dataclass
class UnitResult:
    """What a worker returns for one unit."""

    samples: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)  # split → samples, in order
    items: int = 0  # inputs this unit held (documents, files, pieces, intervals)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (file, reason)
    stats: dict[str, int] = dataclasses.field(default_factory=dict)  # corpus counters, summed into the manifest
    inputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # {path, size, hash} of input files

    def add(self, split: str, samples: Iterable[np.ndarray]) -> None:
        self.samples.setdefault(split, []).extend(samples)

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n


def shard_slice(units: Sequence[T], shard_index: int, num_shards: int) -> Sequence[T]:
    """The contiguous block of units that shard `shard_index` of `num_shards` processes.

    Contiguous (not round-robin) so that concatenating the parts in shard order gives the single-prep order.
    """
    start = len(units) * shard_index // num_shards
    stop = len(units) * (shard_index + 1) // num_shards
    return units[start:stop]


def worker_tokenizer() -> Tokenizer:
    """The running prep's tokenizer, in a worker function (built once per process by `run_units`)."""
    if _tokenizer is None:
        raise RuntimeError("worker_tokenizer() is only set while run_units runs")
    return _tokenizer


def _load_tokenizer(entry: dict[str, Any], tokenizer_dir: str | None) -> None:
    """Build the tokenizer a manifest entry describes (its file, if any, read from `tokenizer_dir`) for this process."""
    global _tokenizer
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # Hugging Face tokenizers (GPT-2): one thread a process
    _tokenizer = tokenizer_class(entry["kind"]).from_manifest(entry, Path(tokenizer_dir) if tokenizer_dir else None)


def run_units(units: Iterable[Any], work: Callable[[Any], UnitResult], writer: ShardWriter, options: PrepOptions,
              *, total: int | None = None, desc: str = "prep", item: str = "file") -> dict[str, int]:
    """Process every unit and write its results in order; return the summed corpus stats. `item` names a unit
    on the progress bar.

    A file-backed tokenizer (SentencePiece, GPT-2, REMI) must be saved in `writer.tokenizer_dir` before this is
    called: the workers load it from there (see `worker_tokenizer`)."""
    global _tokenizer
    saved = writer.tmp / TOKENIZER_DIR
    recipe = (writer.tokenizer.manifest_entry(), str(saved) if saved.is_dir() else None)
    stats: dict[str, int] = {}
    bar = tqdm(total=total, desc=desc, unit=item, disable=not options.progress, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
    started, tokens = time.monotonic(), 0

    def consume(result: UnitResult) -> None:
        nonlocal tokens
        for split, samples in result.samples.items():
            writer.write_many(split, samples)
            tokens += sum(len(s) for s in samples)
        writer.items += result.items
        for file, reason in result.skipped:
            writer.skip(file, reason)
        writer.inputs.extend(result.inputs)
        for key, value in result.stats.items():
            stats[key] = stats.get(key, 0) + value
        bar.update(1)
        bar.set_postfix_str(f"{tokens / max(time.monotonic() - started, 1e-9):,.0f} tok/s, "
                            f"{len(writer.skipped)} skipped", refresh=False)

    try:
        # Here too with a pool: a tokenizer that cannot be loaded fails once, with its own message.
        _load_tokenizer(*recipe)
        workers = options.resolved_workers
        if workers == 1:
            for unit in units:
                consume(work(unit))
        else:
            _run_pool(units, work, consume, workers, recipe)
    finally:
        _tokenizer = None
        bar.close()
    return stats


def _run_pool(units: Iterable[Any], work: Callable[[Any], UnitResult], consume: Callable[[UnitResult], None],
              workers: int, recipe: tuple[dict[str, Any], str | None]) -> None:
    # fork keeps whatever the parent imported (torch, streaming's fallback) without re-importing it per worker.
    context = multiprocessing.get_context("fork")
    in_flight: deque[Future] = deque()
    limit = 2 * workers  # bounded: a slow unit does not let finished results pile up in memory
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_start,
                             initargs=(os.getpid(), recipe)) as pool:
        for unit in units:
            in_flight.append(pool.submit(work, unit))
            while len(in_flight) >= limit:
                consume(in_flight.popleft().result())
        while in_flight:
            consume(in_flight.popleft().result())


def _worker_start(parent: int, recipe: tuple[dict[str, Any], str | None]) -> None:
    """First thing in a pool worker: die with the prep (a SIGKILLed prep leaves no worker behind), then load the
    prep's tokenizer."""
    die_with_parent(parent)
    _load_tokenizer(*recipe)


def pack(tokens: np.ndarray, length: int) -> list[np.ndarray]:
    """Cut a token stream into consecutive samples of `length` tokens; the last one may be shorter (≥ 2 tokens)."""
    samples = [tokens[i:i + length] for i in range(0, len(tokens), length)]
    if samples and len(samples[-1]) < 2:
        samples.pop()  # a lone trailing token has no target
    return samples
