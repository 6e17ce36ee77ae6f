"""The tokenizer interface, and loading the tokenizer of a finished prep from its manifest."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from data_prep.contract import TOKENIZER_DIR, read_manifest
from data_prep.shards import TokenizerInfo

# kind → "module:Class"; each class has from_manifest(entry: dict, tokenizer_dir: Path) -> instance.
_KINDS = {
    "sentencepiece": "data_prep.tokenizers.text:SentencePieceTokenizer",
    "gpt2": "data_prep.tokenizers.text:GPT2Tokenizer",
    "chars": "data_prep.tokenizers.text:CharVocabTokenizer",  # indirect indexing; not DNA's "char"
    "kmer6": "data_prep.tokenizers.dna:Kmer6Tokenizer",
    "char": "data_prep.tokenizers.dna:CharTokenizer",
    "jsb": "data_prep.tokenizers.music:JSBTokenizer",
    "remi": "data_prep.tokenizers.music:REMITokenizer",
}


class Tokenizer(Protocol):
    """What every tokenizer offers. `info` is what the manifest records (kind, vocab size, special ids, ...)."""

    info: TokenizerInfo

    def encode(self, item: Any) -> np.ndarray:
        """One input (a text, a DNA string, a piece) → 1-D int64 array of token ids, without BOS/EOS."""

    def decode(self, ids: Sequence[int] | np.ndarray) -> Any:
        """Token ids → the input they stand for (the inverse of encode where the tokenizer is lossless)."""


def tokenizer_class(kind: str) -> Any:
    if kind not in _KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; known: {', '.join(_KINDS)}")
    module, name = _KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer a finished prep folder was made with."""
    manifest = read_manifest(folder)
    entry = manifest["tokenizer"]
    return tokenizer_class(entry["kind"]).from_manifest(entry, Path(folder) / TOKENIZER_DIR)
