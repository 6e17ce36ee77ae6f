"""The one shard writer every corpus shares: samples → MDS splits, manifest, DONE, atomic publish, merge.

A prep writes into a hidden temporary sibling of its output folder (`.NAME.tmp-HOST-PID`) and, only once every
split is closed and the manifest written, writes DONE and renames the folder into place. A crash or a kill at any
point leaves at most a temporary folder, never a DIR that looks complete. The same arguments on a finished DIR do
nothing; other arguments refuse unless overwrite is asked for.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from data_prep import mds
from data_prep.atomic import atomic_write
from data_prep.contract import DONE, MANIFEST, REQUIRED_KEYS, TOKENIZER_DIR, read_manifest, token_dtype

FORMAT_VERSION = 2  # 2: text chunks of 4 MiB, holdout by (file, document number)


@dataclasses.dataclass
class TokenizerInfo:
    """What the manifest records about a tokenizer."""

    kind: str  # sentencepiece, gpt2, chars (indirect); kmer6, char (DNA); jsb, remi (music)
    vocab_size: int
    pad: int | None = None
    bos: int | None = None
    eos: int | None = None
    vocab: list[str] | None = None  # id → token string, for the small fixed vocabularies
    file: str | None = None  # saved tokenizer file inside DIR/tokenizer/

    def manifest_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"kind": self.kind}
        if self.vocab is not None:
            entry["vocab"] = self.vocab
        if self.file is not None:
            entry["file"] = self.file
        return entry


def fingerprint(corpus: str, args: dict[str, Any]) -> str:
    """A hash of everything that determines the output (arguments, input paths, sizes, modification times)."""
    payload = json.dumps({"corpus": corpus, "args": args, "format": FORMAT_VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def input_record(path: Path, digest: str | None = None) -> dict[str, Any]:
    """{path, size, hash} of an input file (hash: blake2b-128 of its bytes, computed here if not given)."""
    return {"path": str(path), "size": path.stat().st_size, "hash": digest or hash_file(path)}


def hash_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path: Path) -> dict[str, Any]:
    """Path, size and mtime: cheap to take, enough to notice an input that changed since the last prep."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def already_done(out: Path, corpus: str, args: dict[str, Any], overwrite: bool) -> bool:
    """True when `out` is a finished prep of exactly these arguments; raise when it is something else.

    Also checks, before any work starts, that `out` can be written at all (see `check_output`). With `overwrite`,
    only a prep output (a folder holding its manifest.json) may be replaced: a folder the program did not write
    is never deleted.
    """
    check_output(out)
    if not out.exists():
        return False
    done = _read_done(out)
    if done is None:
        if not any(out.iterdir()):
            return False  # an empty folder: nothing to lose
        if not is_prep_output(out):
            raise ValueError(f"{out} exists and is not a prep output (no readable {MANIFEST}); refusing to touch it, "
                             "even with --overwrite: move it away or give another --out")
        if overwrite:
            return False
        raise ValueError(f"{out} exists but is not a finished prep (no {DONE}); pass --overwrite to replace it")
    if done.get("fingerprint") == fingerprint(corpus, args):
        return True
    if not is_prep_output(out):
        raise ValueError(f"{out} holds a {DONE} but no readable {MANIFEST}, so it is not a prep output; refusing to "
                         "touch it, even with --overwrite: move it away or give another --out")
    if overwrite:
        return False
    try:
        old = read_manifest(out)
        changed = sorted(k for k in set(old["args"]) | set(args) if old["args"].get(k) != _jsonable(args.get(k)))
        what = f"different {', '.join(changed)}" if changed else f"corpus {old['corpus']}"
    except ValueError:
        what = "other arguments"
    raise ValueError(f"{out} already holds a prep with {what}; pass --overwrite to replace it")


def _read_done(out: Path) -> dict[str, Any] | None:
    """The DONE record of `out`, or None when there is none (or it is not one this program wrote)."""
    try:
        done = json.loads((out / DONE).read_text())
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return done if isinstance(done, dict) else None


def is_prep_output(folder: Path) -> bool:
    """True when `folder` holds a manifest.json this program writes (a JSON object with the contract's keys).

    The test `--overwrite` relies on: only such a folder may be replaced, whatever else is in it.
    """
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and all(key in manifest for key in REQUIRED_KEYS)


def check_output(out: Path) -> None:
    """Refuse, with one line and before any work, an output that cannot be written: a path that is a file, under
    a file, or in a folder without write permission. (The writer checks again as it goes; this saves the hours a
    prep may take before it would fail.)"""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"the output {out} is a file, not a folder; give --out a folder (the file is left as it is)")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the nearest existing ancestor: the prep creates the folders below it
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"cannot create the output {out}: {folder} is a file, not a folder")
    # os.access: the real user's rights, which is what the writes will meet (root passes unless read-only)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the output {out}: no write permission in {folder}")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


class ShardWriter:
    """Collects samples per split into MDS datasets and publishes DIR atomically.

    Use as a context manager: leaving the block by an exception removes the temporary folder; `publish()` is the
    only way to make DIR appear.
    """

    def __init__(self, out: Path, *, corpus: str, args: dict[str, Any], tokenizer: TokenizerInfo, seq_len: int,
                 compression: str | None = None, size_limit: int = mds.DEFAULT_SHARD_BYTES) -> None:
        self.out, self.corpus, self.args, self.tokenizer, self.seq_len = Path(out), corpus, args, tokenizer, seq_len
        self.compression, self.size_limit = compression, size_limit
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.tmp = _temporary_folder(self.out)
        self._writers: dict[str, Any] = {}
        self.counts: dict[str, dict[str, int]] = {}
        self.skipped: list[dict[str, str]] = []
        self.inputs: list[dict[str, Any]] = []
        self.items = 0  # inputs seen (documents, files, pieces, intervals): the denominator of the skip fraction

    @property
    def tokenizer_dir(self) -> Path:
        """Where a file-backed tokenizer is saved (published as DIR/tokenizer/)."""
        path = self.tmp / TOKENIZER_DIR
        path.mkdir(exist_ok=True)
        return path

    def write(self, split: str, tokens: np.ndarray) -> None:
        """Append one sample (a 1-D array of 2..seq_len+1 token ids) to `split`."""
        if tokens.ndim != 1 or not 2 <= len(tokens) <= self.seq_len + 1:
            raise ValueError(f"a sample must be 1-D with 2..{self.seq_len + 1} tokens; got shape {tokens.shape}")
        if split not in self._writers:
            self._writers[split] = mds.open_writer(self.tmp / split, self.dtype, self.compression, self.size_limit)
            self.counts[split] = {"samples": 0, "tokens": 0}
        self._writers[split].write({mds.TOKENS_COLUMN: np.ascontiguousarray(tokens, dtype=self.dtype)})
        self.counts[split]["samples"] += 1
        self.counts[split]["tokens"] += len(tokens)

    def write_many(self, split: str, samples: Iterable[np.ndarray]) -> None:
        for sample in samples:
            self.write(split, sample)

    def skip(self, file: str, reason: str) -> None:
        self.skipped.append({"file": str(file), "reason": reason})

    def publish(self, max_skip_fraction: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Close the splits, check the run, then `publish_folder`: manifest.json, DONE, rename into place. Returns
        the manifest."""
        for writer in self._writers.values():
            writer.finish()
        self._writers.clear()
        bad = len(self.skipped)
        if bad and bad > max_skip_fraction * max(self.items, 1):
            first = self.skipped[0]
            raise ValueError(f"{bad} of {self.items} inputs are bad ({bad / max(self.items, 1):.1%}), more than "
                             f"--max-skip-fraction={max_skip_fraction}; first: {first['file']}: {first['reason']}")
        empty_shard = self.items == 0 and int(self.args.get("num_shards", 1)) > 1  # nothing was assigned to it
        if not any(c["samples"] for c in self.counts.values()) and not empty_shard:
            raise ValueError(f"no sample was produced from {self.items} inputs ({bad} skipped); nothing to write")
        manifest = {
            "format_version": FORMAT_VERSION,
            "corpus": self.corpus,
            "args": _jsonable(self.args),
            "inputs": self.inputs,
            "seq_len": self.seq_len,
            "tokenizer": self.tokenizer.manifest_entry(),
            "special_ids": {"pad": self.tokenizer.pad, "bos": self.tokenizer.bos, "eos": self.tokenizer.eos},
            "vocab_size": self.tokenizer.vocab_size,
            "dtype": self.dtype.name,
            "splits": self.counts,
            "items": self.items,
            "skipped": self.skipped,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        publish_folder(self.tmp, self.out, manifest, fingerprint(self.corpus, self.args))
        return manifest

    def abort(self) -> None:
        for writer in self._writers.values():
            try:
                writer.finish()
            except Exception:  # noqa: BLE001 - best effort while unwinding another error
                pass
        self._writers.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.tmp.exists():  # not published: an error, or publish() was never reached
            self.abort()
        if isinstance(exc, OSError):
            _about_output(exc, self.tmp, self.out)  # the error propagates, naming DIR rather than a removed file


def _temporary_folder(out: Path) -> Path:
    """Create the hidden sibling `.NAME.tmp-HOST-PID` that a prep or merge of `out` writes into (after removing
    those killed preps of `out` left on this host), named DIR in the error when it cannot be made."""
    tmp = out.parent / f".{out.name}.tmp-{socket.gethostname()}-{os.getpid()}"
    _remove_stale_temporaries(out)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise _about_output(err, tmp, out) from None
    return tmp


def publish_folder(tmp: Path, out: Path, manifest: dict[str, Any], done_fingerprint: str) -> None:
    """The last step of every prep and merge: write manifest.json, then DONE (the fingerprint of the arguments and
    the manifest's `created`), each atomically and fsynced, then rename the finished `tmp` to `out`."""
    atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    atomic_write(tmp / DONE, json.dumps({"fingerprint": done_fingerprint, "created": manifest["created"]}) + "\n")
    _replace_dir(tmp, out)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename tmp to out. An existing out (an empty folder, or a prep output with overwrite) is moved aside first,
    then removed; if the second rename fails it is moved back, so a failure never loses the old output."""
    if out.exists():
        if any(out.iterdir()) and not is_prep_output(out):  # appeared since already_done looked: not ours to delete
            raise ValueError(f"{out} appeared during the prep and is not a prep output; refusing to replace it "
                             f"(the new output is not kept)")
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, trash)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(trash, out)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)


# errors that mean "the output's file system is full": write() reports them without a file name
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _about_output(err: OSError, tmp: Path, out: Path) -> OSError:
    """Make an OSError met while writing the output name DIR instead of the temporary folder (which is removed
    on the way out, so its name would only confuse); a full disk always names DIR (write() gives no name, a copy
    names its source). Returns the same error, changed in place."""
    if err.errno in _DISK_FULL:  # always about where we write (a copy names its source first)
        err.filename, err.filename2 = str(out), None
        return err
    for attr in ("filename", "filename2"):
        name = getattr(err, attr)
        if isinstance(name, (str, bytes, os.PathLike)) and Path(os.fsdecode(name)).is_relative_to(tmp):
            setattr(err, attr, str(out))
    return err


def _remove_stale_temporaries(out: Path) -> None:
    """Remove temporary folders left by killed preps of the same output on this host (their process is gone)."""
    host = socket.gethostname()
    for stale in out.parent.glob(f".{out.name}.tmp-{host}-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------------- merge


def merge_parts(out: Path, parts: Sequence[Path], overwrite: bool = False) -> dict[str, Any] | None:
    """Join the outputs of `--shard-index i --num-shards n` runs into one dataset at `out`.

    Shard files are hard-linked (copied across file systems) into out/<split>/part-NNNNN/ and streaming's index
    merge writes out/<split>/index.json, so samples come in part order: identical to a single prep. Returns the
    manifest, or None when `out` already is this merge.
    """
    if not parts:
        raise ValueError("merge needs at least one part folder")
    manifests = [read_manifest(p) for p in parts]
    _check_parts_compatible(parts, manifests)
    manifests, parts = zip(*sorted(zip(manifests, parts), key=lambda mp: mp[0]["args"].get("shard_index", 0)))
    args = {"parts": [str(Path(p).resolve()) for p in parts],
            "part_fingerprints": [json.loads((Path(p) / DONE).read_text())["fingerprint"] for p in parts]}
    if already_done(out, "merge", args, overwrite):
        return None
    first = manifests[0]
    tmp = _temporary_folder(out)
    try:
        if not any(c["samples"] for m in manifests for c in m["splits"].values()):
            raise ValueError(f"the {len(parts)} parts hold no sample at all; nothing to merge")
        splits: dict[str, dict[str, int]] = {}
        for split in sorted({s for m in manifests for s in m["splits"]}):
            part_dirs = []
            for index, part in enumerate(parts):
                if (Path(part) / split / "index.json").is_file():
                    part_dirs.append(_link_tree(Path(part) / split, tmp / split / f"part-{index:05d}"))
            mds.merge_indexes(tmp / split, part_dirs)
            splits[split] = {key: sum(m["splits"].get(split, {}).get(key, 0) for m in manifests)
                             for key in ("samples", "tokens")}
        if (Path(parts[0]) / TOKENIZER_DIR).is_dir():
            shutil.copytree(Path(parts[0]) / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        part_args = {k: v for k, v in first["args"].items() if k not in ("shard_index", "out")}
        manifest = dict(first)
        manifest.update({
            "args": {**part_args, "merged_from": args["parts"]},
            "inputs": list({i["path"]: i for m in manifests for i in m["inputs"]}.values()),
            "splits": splits,
            "items": sum(m.get("items", 0) for m in manifests),
            "skipped": [s for m in manifests for s in m["skipped"]],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        for key in ("stats",):
            if key in first:
                manifest[key] = _sum_stats([m.get(key, {}) for m in manifests])
        publish_folder(tmp, out, manifest, fingerprint("merge", args))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            _about_output(err, tmp, out)
        raise
    return manifest


def _check_parts_compatible(parts: Sequence[Path], manifests: Sequence[dict[str, Any]]) -> None:
    first = manifests[0]
    same = lambda m: {k: v for k, v in m["args"].items() if k not in ("shard_index", "out", "workers")}
    for part, manifest in zip(parts, manifests):
        for key in ("corpus", "seq_len", "tokenizer", "vocab_size", "dtype"):
            if manifest[key] != first[key]:
                raise ValueError(f"cannot merge {part}: its {key} differs from {parts[0]}'s")
        if same(manifest) != same(first):
            raise ValueError(f"cannot merge {part}: it was prepared with other arguments than {parts[0]}")
    num_shards = first["args"].get("num_shards", 1)
    indices = sorted(m["args"].get("shard_index", 0) for m in manifests)
    if indices != list(range(num_shards)):
        missing = sorted(set(range(num_shards)) - set(indices))
        raise ValueError(f"parts cover shard indices {indices} of --num-shards {num_shards}"
                         + (f"; missing {missing}" if missing else "; duplicates"))


def _link_tree(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for item in src.iterdir():
        try:
            os.link(item, dst / item.name)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(item, dst / item.name)
    return dst


def _sum_stats(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for entry in stats:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total
