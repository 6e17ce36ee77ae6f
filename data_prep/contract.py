"""The contract between `pope prep` and everything that reads its output.

A finished prep folder DIR holds:
- `DIR/<split>/` for split in train, val (and test where the corpus defines one): MDS datasets with one column
  `tokens`, a 1-D uint16 array (uint32 when the vocabulary exceeds 65536) of up to seq_len + 1 tokens;
- `DIR/manifest.json`: what was made from what (see `REQUIRED_KEYS`), per split sample and token counts, the
  tokenizer and its special ids, and the inputs that were skipped and why;
- `DIR/tokenizer/`: the saved tokenizer where it is a file (SentencePiece, GPT-2 BPE, miditok);
- `DIR/DONE`, written last, holding the fingerprint of the arguments. A folder without DONE is not a dataset.

Two folders' token ids mean the same when their tokenizers do (`tokenizer_identity`): every reader that puts a
model trained on one folder onto another (eval on other data, fine-tuning from weights) checks that here.
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
REQUIRED_KEYS = ("corpus", "args", "inputs", "seq_len", "tokenizer", "special_ids", "vocab_size", "dtype",
                 "splits", "skipped")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


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


def tokenizer_identity(folder: str | Path) -> dict[str, Any]:
    """What makes two prep folders' token ids mean the same: the manifest's tokenizer kind, vocabulary (small fixed
    ones), vocab_size, special ids, and the sha256 of the tokenizer file (SentencePiece, GPT-2, REMI)."""
    folder = Path(folder)
    manifest = read_manifest(folder) if (folder / DONE).is_file() else _plain_manifest(folder)
    entry = manifest["tokenizer"]
    identity: dict[str, Any] = {"kind": entry.get("kind"), "vocab_size": manifest.get("vocab_size"),
                                "special_ids": manifest.get("special_ids")}
    if entry.get("vocab") is not None:
        identity["vocab"] = hashlib.sha256(repr(entry["vocab"]).encode()).hexdigest()[:16]
    if entry.get("file"):
        file = folder / TOKENIZER_DIR / entry["file"]
        if not file.is_file():
            raise ValueError(f"{file} is missing: the tokenizer of {folder} cannot be compared")
        identity["file"] = f"{entry['file']} sha256 {hashlib.sha256(file.read_bytes()).hexdigest()[:16]}"
    return identity


def _plain_manifest(folder: Path) -> dict[str, Any]:
    """An export folder's copy of its dataset's manifest (no DONE beside it)."""
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"{folder} has no {MANIFEST}: its tokenizer is unknown (is the run's data.path reachable "
                         "from here?)")
    return json.loads((folder / MANIFEST).read_text())


def check_same_tokenizer(model_data: str | Path, data: str | Path, what: str) -> None:
    """Refuse (one line) a data folder whose tokenizer differs from the one `what` was trained with."""
    if not Path(model_data).is_dir():
        raise ValueError(f"{what} was trained on {model_data}, which is not reachable from here: its tokenizer "
                         "cannot be checked (run from the folder you trained in)")
    ours, theirs = tokenizer_identity(model_data), tokenizer_identity(data)
    if ours != theirs:
        differ = [k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)]
        shown = "; ".join(f"{k} {ours.get(k)} vs {theirs.get(k)}" for k in sorted(differ) if k != "vocab")
        if "vocab" in differ:
            shown = (shown + "; " if shown else "") + "vocabularies differ"
        hint = (f" (pope prep text --tokenizer-model {Path(model_data) / TOKENIZER_DIR / 'spm.model'})"
                if ours.get("kind") == "sentencepiece" else "")
        raise ValueError(f"{data} was not prepared with the tokenizer of {what} (data {model_data}): {shown}; "
                         f"prepare it with that tokenizer{hint}")
