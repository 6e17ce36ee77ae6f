"""Batches from a `pope prep` folder through mosaicml-streaming, and the loader state that makes resume exact.

Each process reads its share of a split with a StreamingDataset (local=the prep folder, remote=None, a fixed
shuffle seed, batch_size=the micro-batch, a fixed num_canonical_nodes so the sample order does not depend on the
number of processes) inside a StreamingDataLoader, whose state_dict() is the data position saved with every
checkpoint.

Windows: a prepared sample holds up to P+1 tokens (P: the prep's seq_len); training at S = data.seq_len < P cuts it
into k = ceil(P/S) windows, window j being tokens [j·S, j·S+S+1) (consecutive windows share one token, so every
token of the sample is a target exactly once). The dataset the loader shuffles has k items per sample (item i is
window i mod k of sample i div k), so streaming's shuffle, its partition over ranks and workers, and its
state_dict/load_state_dict act on windows exactly as they did on samples. A window that starts at or past the
last token of a shorter sample has fewer than 2 tokens: it comes back empty and becomes a padding row (no
target). With data.loss_on=last a sample is one example and is never cut (k = 1).

Loader workers only read windows; turning them into (inputs, targets) tensors, and the per-corpus
augmentations, happen in the training process with a generator seeded by (seed, step, micro-step, rank): that keeps
a resumed run's batches identical to an uninterrupted run's, which worker-side randomness would not.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import multiprocessing
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from data_prep.contract import manifest_hash, read_manifest
from data_prep.lifetime import loader_worker_init
from data_prep.mds import TOKENS_COLUMN, import_streaming
from data_prep.shm import remove_dead_segments
from data_prep.tokenizers import load_tokenizer
from pipeline.config import Config, DataConfig
from pipeline.distributed import DistEnv
from pipeline.model import IGNORE_INDEX

ID_KEY = "id"  # a batch's item (window) ids, beside its tokens


@dataclasses.dataclass
class Dataset:
    """A finished prep folder, as training sees it."""

    path: Path
    manifest: dict[str, Any]
    hash: str

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def pad_id(self) -> int:
        ids = self.manifest["special_ids"]
        return next((int(ids[k]) for k in ("pad", "eos") if ids.get(k) is not None), 0)

    def has_split(self, split: str) -> bool:
        return (self.path / split / "index.json").is_file()


def open_dataset(config: Config) -> Dataset:
    """Read and check the dataset a config trains on (its manifest, its train split); `pipeline.config.resolve`
    then fits the config to it."""
    if not config.data.path:
        raise ValueError("data.path is empty: point it at a `pope prep` output folder")
    path = Path(config.data.path)
    dataset = Dataset(path, read_manifest(path), manifest_hash(path))
    if not dataset.has_split(config.data.train_split):
        raise ValueError(f"dataset {path} has no '{config.data.train_split}' split")
    return dataset


def windows_per_sample(dataset: Dataset, cfg: DataConfig) -> int:
    """k: the windows of data.seq_len+1 tokens a full prepared sample is cut into (1 with data.loss_on=last)."""
    if cfg.loss_on == "last":
        return 1
    return math.ceil(int(dataset.manifest["seq_len"]) / cfg.seq_len)


def cut_window(tokens: np.ndarray, window: int, seq_len: int) -> np.ndarray:
    """Window `window` of a sample: tokens [window·seq_len, window·seq_len + seq_len + 1), or an empty array where
    fewer than 2 tokens (no target) are left there."""
    piece = tokens[window * seq_len: window * seq_len + seq_len + 1]
    return piece if len(piece) >= 2 else piece[:0]


class _WindowSpanner:
    """Item (window) id → (shard, sample within the shard) of the sample it is cut from, for streaming.

    StreamingDataset reads `spanner[item]` to find an item's shard (to prepare it) and the sample to read in it;
    the windows of sample s are items s·k .. s·k+k-1, so this is the sample spanner at item // k.
    """

    def __init__(self, samples: Any, per_sample: int) -> None:
        self.samples, self.per_sample = samples, per_sample

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self.samples[index // self.per_sample]


def _windowed_class() -> type:
    """StreamingDataset with k items per sample; built on first use because streaming is imported lazily."""
    cached = globals().get("WindowedStreamingDataset")
    if cached is not None:
        return cached
    streaming = import_streaming()

    class WindowedStreamingDataset(streaming.StreamingDataset):
        """A StreamingDataset whose items are the windows of its samples (see the module docstring).

        Every count streaming partitions and shuffles by (samples per shard, stream and dataset, and their offsets)
        is scaled by k, and the spanner maps an item to its sample; the windows of one sample are consecutive
        items of one shard, which streaming's shuffle spreads like the samples of a shard.
        """

        def __init__(self, *, seq_len: int, per_sample: int, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.window_seq_len, self.per_sample = seq_len, per_sample
            self.num_source_samples = self.num_samples
            if per_sample == 1:
                return
            self.num_samples *= per_sample
            self.samples_per_stream = self.samples_per_stream * per_sample
            self.sample_offset_per_stream = self.sample_offset_per_stream * per_sample
            self.samples_per_shard = self.samples_per_shard * per_sample
            self.sample_offset_per_shard = self.sample_offset_per_shard * per_sample
            self.spanner = _WindowSpanner(self.spanner, per_sample)
            # The epoch and each process's share, as StreamingDataset.__init__ derives them, now in windows.
            # make_loader gives no stream weights and no epoch_size: each stream draws all its items once, so its
            # proportion and repeat stay and what it draws grows by k.
            for stream in self.streams:
                stream.choose = int(stream.choose) * per_sample
            self.epoch_size = sum(int(stream.choose) for stream in self.streams)
            self.length = math.ceil(self.epoch_size / self._parallel_rank_world.num_ranks)

        def get_item(self, sample_id: int, retry: int = 7) -> Any:
            """The window `sample_id` as {"tokens": window, "id": sample_id}: the id is what the training loop's
            per-step digest of the samples it trained on is made of."""
            sample = super().get_item(sample_id, retry)
            tokens = sample[TOKENS_COLUMN] if self.per_sample == 1 else \
                cut_window(sample[TOKENS_COLUMN], sample_id % self.per_sample, self.window_seq_len)
            return {TOKENS_COLUMN: tokens, ID_KEY: sample_id}

    # Pickled by name into loader workers: it must be found as pipeline.data.WindowedStreamingDataset.
    WindowedStreamingDataset.__qualname__ = "WindowedStreamingDataset"
    WindowedStreamingDataset.__module__ = __name__
    globals()["WindowedStreamingDataset"] = WindowedStreamingDataset
    return WindowedStreamingDataset


def __getattr__(name: str) -> Any:
    if name == "WindowedStreamingDataset":  # a loader worker unpickling the dataset
        return _windowed_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclasses.dataclass
class WindowCount:
    """What an epoch of one split is made of."""

    samples: int
    per_sample: int
    empty: int  # windows past the end of shorter samples: padding rows without a target
    seq_len: int

    @property
    def windows(self) -> int:
        return self.samples * self.per_sample

    def describe(self) -> str:
        return (f"{self.windows:,} windows of {self.seq_len + 1} tokens per epoch from {self.samples:,} samples "
                f"({self.per_sample} per sample; {self.empty:,} empty, trained as padding windows)")


def sample_lengths(split_dir: Path) -> np.ndarray:
    """The token count of every sample of an MDS split, in order, from the shards' offset tables alone.

    An MDS sample of our one column is [column size: u32][ndim|shape-dtype code: 1 byte][length: 1, 2, 4 or 8
    bytes, the smallest unsigned int that holds it][tokens], so its byte size (two neighbouring offsets) gives
    its length without reading the tokens: counting the windows of a large corpus reads ~4 bytes per sample.
    """
    index = json.loads((split_dir / "index.json").read_text())
    out = []
    for shard in index["shards"]:
        itemsize = np.dtype(shard["column_encodings"][0].split(":")[1]).itemsize
        raw = split_dir / shard["raw_data"]["basename"]
        n = int(shard["samples"])
        if raw.is_file():
            with open(raw, "rb") as file:
                head = file.read(4 * (n + 2))
        else:  # a compressed shard streaming has not unpacked yet
            from streaming.base.compression import decompress

            head = decompress(shard["compression"], (split_dir / shard["zip_data"]["basename"]).read_bytes())
        offsets = np.frombuffer(head, np.uint32, count=n + 2)[1:].astype(np.int64)
        payload = np.diff(offsets) - 5  # size and code bytes
        lengths = np.full(n, -1, np.int64)
        # The byte size grows with the length, so at most one (width, length) pair matches it.
        for width, low, high in ((1, 1, 1 << 8), (2, 1 << 8, 1 << 16), (4, 1 << 16, 1 << 32), (8, 1 << 32, 1 << 62)):
            candidate, rest = np.divmod(payload - width, itemsize)
            lengths = np.where((rest == 0) & (candidate >= low) & (candidate < high), candidate, lengths)
        if (lengths < 0).any():
            raise ValueError(f"{raw} does not have the MDS layout pope prep writes; prepare the data again")
        out.append(lengths)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def count_windows(dataset: Dataset, cfg: DataConfig, split: str) -> WindowCount:
    """The windows an epoch of `split` has at data.seq_len, and how many of them are empty."""
    per_sample = windows_per_sample(dataset, cfg)
    lengths = sample_lengths(dataset.path / split)
    # Windows j with j·S < L-1 hold at least one target; the rest of the k are empty.
    used = np.minimum(per_sample, -(-(lengths - 1) // cfg.seq_len)) if per_sample > 1 else np.ones_like(lengths)
    return WindowCount(len(lengths), per_sample, int((per_sample - used).sum()), cfg.seq_len)


def _collate(samples: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Workers hand over the raw samples and their item ids; a dict so StreamingDataLoader counts samples, not
    tokens."""
    return {TOKENS_COLUMN: [s[TOKENS_COLUMN] for s in samples], ID_KEY: [int(s[ID_KEY]) for s in samples]}


def digest_terms(ids: list[int]) -> tuple[float, float]:
    """This process's share of the step's sample digest: the sums of the two 32-bit halves of splitmix64(id) over
    its window ids. Sums do not depend on order, so the processes' shares add up (in the step's one all-reduce,
    pipeline/stopping.py) to the same terms however the windows were spread; float64 holds them exactly up to
    2^21 windows per step."""
    x = np.asarray(ids, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)  # uint64 arithmetic wraps, as splitmix64's
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    low, high = x & np.uint64(0xFFFFFFFF), x >> np.uint64(32)
    return float(low.sum(dtype=np.float64)), float(high.sum(dtype=np.float64))


def sample_digest(terms: tuple[float, float]) -> str:
    """The step's sample digest from the all-processes sums of `digest_terms`: two runs trained the same windows at
    a step exactly when their digests agree (up to a hash collision), whatever the number of processes or
    micro-batches (`pope train`'s metrics.jsonl, data/sample_digest)."""
    return f"{int(terms[0]):x}-{int(terms[1]):x}"


def clean_stale_shared_memory(env: DistEnv) -> None:
    """Remove the shared-memory segments dead processes left in /dev/shm (collective: every rank calls it).

    Only segments of jobs whose processes are all gone are removed (data_prep/shm.py), so other jobs on the node, running or
    starting, are never touched; each job's segments live in a namespace of its own anyway.
    """
    from pipeline import distributed

    if env.local_rank == 0:
        remove_dead_segments()
    distributed.barrier(env)


def make_loader(dataset: Dataset, cfg: DataConfig, split: str, train: bool) -> Any:
    """A StreamingDataLoader over the windows of one split for this process (rank and world come from the
    environment); each batch is {"tokens": [window arrays]}, an empty array for a padding window."""
    streaming = import_streaming()
    streaming_dataset = _windowed_class()(
        seq_len=cfg.seq_len, per_sample=windows_per_sample(dataset, cfg),
        local=str(dataset.path / split), remote=None, split=None, shuffle=train, shuffle_seed=cfg.shuffle_seed,
        batch_size=cfg.micro_batch_size, num_canonical_nodes=cfg.num_canonical_nodes, predownload=None)
    # A generator of its own: every new iterator of a torch DataLoader draws a seed from the generator it was
    # given, by default the global one, which would shift the dropout masks of a resumed run.
    generator = torch.Generator().manual_seed(cfg.shuffle_seed)
    return streaming.StreamingDataLoader(
        streaming_dataset, batch_size=cfg.micro_batch_size, collate_fn=_collate, num_workers=cfg.num_workers,
        drop_last=train, persistent_workers=False, generator=generator,
        # Workers forked by this process check that it is still their parent; under forkserver/spawn their parent
        # is a server process (which dies with this one), so there is nothing to compare with.
        worker_init_fn=functools.partial(loader_worker_init,
                                         os.getpid() if multiprocessing.get_start_method() == "fork" else None))


def batches_forever(loader: Any) -> Iterator[dict[str, list[np.ndarray]]]:
    """Batches across epochs: a new pass over the split begins where the last one ended.

    One empty pass is normal: a run resumed from a checkpoint taken right after an epoch's last full batch
    starts at the end of that epoch. Two in a row mean the split cannot fill one batch.
    """
    empty_passes = 0
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        empty_passes = empty_passes + 1 if empty else 0
        if empty_passes >= 2:
            raise ValueError("the training split yields no batch: fewer samples than processes × micro-batch")


class BatchMaker:
    """Raw samples (windows) → (inputs, targets) tensors of shape (batch, seq_len), with the configured
    augmentations; a window of fewer than 2 tokens becomes a row of padding with no target."""

    def __init__(self, config: Config, dataset: Dataset) -> None:
        self.seq_len, self.loss_on, self.seed = config.data.seq_len, config.data.loss_on, config.seed
        self.pad_id = dataset.pad_id
        self.reverse_complement = config.data.reverse_complement
        self.transpose = config.data.transpose
        needs_tokenizer = self.reverse_complement > 0 or self.transpose
        self.tokenizer = load_tokenizer(dataset.path) if needs_tokenizer else None
        if self.reverse_complement > 0 and not hasattr(self.tokenizer, "reverse_complement"):
            raise ValueError(f"data.reverse_complement needs a DNA tokenizer; {dataset.path} uses "
                             f"{dataset.manifest['tokenizer']['kind']}")
        if self.transpose and not hasattr(self.tokenizer, "transpose"):
            raise ValueError(f"data.transpose needs the JSB tokenizer; {dataset.path} uses "
                             f"{dataset.manifest['tokenizer']['kind']}")

    def __call__(self, samples: list[np.ndarray], step: int = 0, ids: list[int] | None = None,
                 augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """`ids`: the windows' item ids. A window's augmentation draws from a generator of (seed, step, id), so it
        does not depend on which process or micro-batch the window landed in: a run resumed on another number of
        processes augments every window as the uninterrupted run would have."""
        batch = len(samples)
        ids = list(range(batch)) if ids is None else ids
        inputs = torch.full((batch, self.seq_len), self.pad_id, dtype=torch.long)
        targets = torch.full((batch, self.seq_len), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):
            tokens = np.asarray(sample, dtype=np.int64)
            if len(tokens) < 2:  # a padding window (past the end of a shorter sample): no input, no target
                continue
            if self.loss_on == "last" and len(tokens) > self.seq_len + 1:
                raise ValueError(f"a sample of {len(tokens)} tokens is longer than data.seq_len+1 with "
                                 f"data.loss_on=last: its final token would be cut off; raise data.seq_len")
            if augment:
                tokens = self._augment(tokens, np.random.default_rng([self.seed, step, int(ids[row])]))
            tokens = torch.from_numpy(tokens[: self.seq_len + 1])
            n = len(tokens) - 1
            inputs[row, :n] = tokens[:-1]
            if self.loss_on == "last":
                targets[row, n - 1] = tokens[-1]
            else:
                targets[row, :n] = tokens[1:]
        return inputs, targets

    def _augment(self, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.reverse_complement > 0 and rng.random() < self.reverse_complement:
            tokens = self.tokenizer.reverse_complement(tokens)
        if self.transpose:
            shifted = self.tokenizer.transpose(tokens, int(rng.integers(-3, 4)))
            tokens = shifted if shifted is not None else tokens
        return tokens
