"""The contract between `pope prep` and everything that reads its output.

A finished prep folder DIR holds:
- `DIR/<split>/` for split in train, val (and test where the corpus defines one): MDS datasets with one column
  `tokens`, a 1-D uint16 array (uint32 when the vocabulary exceeds 65536) of up to seq_len + 1 tokens;
- `DIR/manifest.json`: what was made from what (see `REQUIRED_KEYS`), per split sample and token counts, the
  tokenizer and its special ids, and the inputs that were skipped and why;
- `DIR/tokenizer/`: the saved tokenizer where it is a file (SentencePiece, GPT-2 BPE, miditok);
- `DIR/DONE`, written last, holding the fingerprint of the arguments. A folder without DONE is not a dataset.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
DONE = "DONE"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val", "test")
REQUIRED_KEYS = ("corpus", "args", "inputs", "seq_len", "tokenizer", "special_ids", "vocab_size", "dtype",
                 "splits", "skipped")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / DONE).is_file() and (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a finished prep, or a ValueError that says what is wrong with the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"dataset folder {folder} does not exist; make it with `pope prep`")
    if not (folder / DONE).is_file():
        raise ValueError(f"dataset folder {folder} has no DONE marker: the prep did not finish (run it again)")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{folder / MANIFEST} is unreadable: {err}") from None
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{folder / MANIFEST} lacks {', '.join(missing)}; was it written by `pope prep`?")
    return manifest


def manifest_hash(folder: str | Path) -> str:
    """A short hash of manifest.json, which records the inputs' hashes, the tokenizer and the counts: it changes
    whenever the data does (checkpoints store it to refuse resuming on other data)."""
    return hashlib.sha256((Path(folder) / MANIFEST).read_bytes()).hexdigest()[:16]
