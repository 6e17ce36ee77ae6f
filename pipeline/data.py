"""Batches from a `pope prep` folder through mosaicml-streaming, and the loader state that makes resume exact.

Each process reads its share of a split with a StreamingDataset (local=the prep folder, remote=None, a fixed
shuffle seed, batch_size=the micro-batch, a fixed num_canonical_nodes so the sample order does not depend on the
number of processes) inside a StreamingDataLoader, whose state_dict() is the data position saved with every
checkpoint. Loader workers only read samples; turning them into (inputs, targets) tensors, and the per-corpus
augmentations, happen in the training process with a generator seeded by (seed, step, micro-step, rank): that keeps
a resumed run's batches identical to an uninterrupted run's, which worker-side randomness would not.
"""

from __future__ import annotations

import dataclasses
import functools
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
    """Read and check the dataset a config trains on; fill model.vocab_size when the config leaves it to data."""
    if not config.data.path:
        raise ValueError("data.path is empty: point it at a `pope prep` output folder")
    path = Path(config.data.path)
    manifest = read_manifest(path)
    dataset = Dataset(path, manifest, manifest_hash(path))
    if config.model.vocab_size == 0:
        config.model.vocab_size = dataset.vocab_size
    elif config.model.vocab_size != dataset.vocab_size:
        raise ValueError(f"model.vocab_size={config.model.vocab_size} but dataset {path} has a vocabulary of "
                         f"{dataset.vocab_size} ({manifest['tokenizer']['kind']}); set model.vocab_size="
                         f"{dataset.vocab_size} (or 0 to follow the data)")
    if config.data.seq_len > int(manifest["seq_len"]):
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds the prepared seq_len {manifest['seq_len']} "
                         f"of {path}; prepare again with --seq-len {config.data.seq_len} or lower data.seq_len")
    if not dataset.has_split(config.data.train_split):
        raise ValueError(f"dataset {path} has no '{config.data.train_split}' split")
    return dataset


def _collate(samples: list[dict[str, Any]]) -> dict[str, list[np.ndarray]]:
    """Workers hand over the raw samples; a dict so StreamingDataLoader counts samples, not tokens."""
    return {TOKENS_COLUMN: [s[TOKENS_COLUMN] for s in samples]}


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
    """A StreamingDataLoader over one split for this process (rank and world come from the environment)."""
    streaming = import_streaming()
    streaming_dataset = streaming.StreamingDataset(
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
    """Raw samples → (inputs, targets) tensors of shape (batch, seq_len), with the configured augmentations."""

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

    def __call__(self, samples: list[np.ndarray], step: int = 0, micro: int = 0, rank: int = 0,
                 augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro, rank])
        batch = len(samples)
        inputs = torch.full((batch, self.seq_len), self.pad_id, dtype=torch.long)
        targets = torch.full((batch, self.seq_len), IGNORE_INDEX, dtype=torch.long)
        for row, sample in enumerate(samples):
            tokens = np.asarray(sample, dtype=np.int64)
            if self.loss_on == "last" and len(tokens) > self.seq_len + 1:
                raise ValueError(f"a sample of {len(tokens)} tokens is longer than data.seq_len+1 with "
                                 f"data.loss_on=last: its final token would be cut off; raise data.seq_len")
            if augment:
                tokens = self._augment(tokens, rng)
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
