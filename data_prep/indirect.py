"""The indirect indexing task of the PoPE paper, generated: `<string>, <char>, <±shift>, <target>`.

A string of 20–40 distinct letters from [A-Za-z]; a source character drawn from it; a shift drawn uniformly from
[−15, +15] among those that land inside the string; the target is the letter `shift` places from the source.
Example: `NZTUIGWkXFrhCJDzscat, N, +4, I`. Each sample is BOS + the example's characters (at most 52 tokens), so
the last token is the target: train with data.loss_on=last, which scores the final token only, as the paper does.

Samples are generated in units of 10,000 examples, each from its own seed (seed, split, unit), so the output does
not depend on the number of workers or shards. Splits: 1M / 10k / 10k examples by default, as in the paper.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

from data_prep.parallel import PrepOptions, UnitResult, run_units, shard_slice, worker_tokenizer
from data_prep.shards import ShardWriter, already_done
from data_prep.tokenizers.text import CharVocabTokenizer

LETTERS = string.ascii_uppercase + string.ascii_lowercase
VOCAB = ["<pad>", "<bos>", "<eos>"] + list(LETTERS + string.digits + ", +-")  # 69 tokens
UNIT = 10_000
MAX_SHIFT = 15


def example(rng: np.random.Generator, min_len: int = 20, max_len: int = 40) -> str:
    """One task instance as text."""
    length = int(rng.integers(min_len, max_len + 1))
    letters = [LETTERS[i] for i in rng.choice(len(LETTERS), size=length, replace=False)]
    source = int(rng.integers(length))
    shifts = [s for s in range(-MAX_SHIFT, MAX_SHIFT + 1) if 0 <= source + s < length]
    shift = shifts[int(rng.integers(len(shifts)))]
    return f"{''.join(letters)}, {letters[source]}, {shift:+d}, {letters[source + shift]}"


def _unit(unit: tuple[str, int, int, int]) -> UnitResult:
    split, index, count, seed = unit
    rng = np.random.default_rng([seed, ("train", "val", "test").index(split), index])
    tokenizer = worker_tokenizer()
    samples = [np.concatenate(([tokenizer.info.bos], tokenizer.encode(example(rng)))) for _ in range(count)]
    result = UnitResult(items=count)
    result.add(split, samples)
    return result


def prep_indirect(out: Path, *, train: int = 1_000_000, val: int = 10_000, test: int = 10_000, seed: int = 1234,
                  seq_len: int = 64, options: PrepOptions) -> dict | None:
    """Generate the task into `out`; returns the manifest, or None when `out` already holds this prep."""
    if seq_len + 1 < 52:
        raise ValueError(f"--seq-len must be at least 51 to hold the longest example; got {seq_len}")
    if min(train, val, test) < 0 or train == 0:
        raise ValueError("--train must be positive and --val/--test non-negative")
    args = {"train": train, "val": val, "test": test, "seed": seed, "seq_len": seq_len, **options.shard_args()}
    if already_done(out, "indirect", args, options.overwrite):
        return None
    units = [(split, i, min(UNIT, total - i * UNIT), seed)
             for split, total in (("train", train), ("val", val), ("test", test))
             for i in range((total + UNIT - 1) // UNIT)]
    units = shard_slice(units, options.shard_index, options.num_shards)
    tokenizer = CharVocabTokenizer(VOCAB, kind="chars")
    with ShardWriter(Path(out), corpus="indirect", args=args, tokenizer=tokenizer.info, seq_len=seq_len,
                     compression=options.compression) as writer:
        run_units(units, _unit, writer, options, total=len(units), desc="indirect")
        return writer.publish(options.max_skip_fraction, extra={"task": "indirect indexing, loss on the last token"})
