"""Web text (OpenWebText and friends) → packed token sequences, in memory bounded by a constant.

Inputs, in the forms users hold OpenWebText in:
- the original release: a tarball (`openwebtext.tar.xz`) of `urlsf_subset*.xz` archives, or a folder of them; each
  subset is an xz-compressed tar of .txt files, one document per file;
- `.jsonl`, `.jsonl.gz`, `.jsonl.zst` with a `text` field (one document per line);
- `.parquet` with a `text` column (a Hugging Face export);
- a folder of `.txt` files, one document per file.

Inputs are listed as *units* (one file, one member of an outer tarball, a batch of up to 512 .txt files holding
at most CHUNK_BYTES); sharded preps take a contiguous slice of that list. The main process cuts each unit into
*chunks*, the pieces of work a worker tokenizes and packs: a jsonl file is read as a (decompressed) stream and cut
into runs of whole lines of at most CHUNK_BYTES (a longer line is a chunk of its own), a parquet file into runs of
row-batch rows holding at most CHUNK_BYTES characters, a tar archive larger than CHUNK_BYTES into runs of whole
.txt members; a smaller archive (an OpenWebText subset, ~0.6 MB) or a .txt batch is one chunk, read by its worker.
Cuts depend only on the content, so neither --workers nor sharding changes the output. Documents of a chunk are
tokenized, each followed by EOS, and packed into samples of seq_len+1 tokens; packing restarts at each chunk.
A seeded hash of (file name, document number within the file: line, row or member number; 0 for a .txt file)
sends --val-fraction of the documents to the validation split, whatever the chunking.

Memory: the main process holds one chunk being cut plus at most 2×workers chunks and results in flight (parquet:
plus the row group being decoded); a worker holds one chunk's documents, tokens and samples. Neither grows with
the input file, only with CHUNK_BYTES (and with a single document or jsonl line longer than that).

Bad input: a document that is not valid UTF-8, or a jsonl line that is not JSON, is skipped and listed. A file
whose container is damaged (a truncated xz, gzip or zstd stream, a corrupt parquet file) keeps the documents read
intact before the damage, and the rest is skipped and listed as "damaged after N lines|rows|documents: <reason>;
the rest skipped" (N: records read intact before it). Where a stream breaks is a property of the file, so this is
deterministic; a partial last line or member before the break is never used.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import heapq
import io
import json
import lzma
import os
import shutil
import tarfile
import tempfile
import zlib
from collections import Counter
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import numpy as np

from data_prep.atomic import atomic_write
from data_prep.parallel import PrepOptions, UnitResult, pack, run_units, shard_slice, worker_tokenizer
from data_prep.shards import ShardWriter, already_done, file_stamp, input_record
from data_prep.tokenizers.text import GPT2Tokenizer, SentencePieceTokenizer

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".xz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz")
TXT_BATCH = 512  # at most this many .txt files per unit
# The size of a chunk of work: bounds the memory of every process (a worker peaks at ~40× a chunk: Python strings,
# token lists, samples). Read at call time, so a test can lower it.
CHUNK_BYTES = 4 << 20
READ_BYTES = 1 << 20  # block size of sequential reads
PARQUET_BATCH_ROWS = 1024
CORRUPT = (tarfile.TarError, lzma.LZMAError, EOFError, zlib.error, OSError, gzip.BadGzipFile)


@dataclasses.dataclass(frozen=True)
class TextUnit:
    """One input unit; `name` is stable across machines (relative to its input) and names its documents."""

    name: str
    kind: str  # tar | jsonl | parquet | txt | error
    paths: tuple[str, ...] = ()  # files on disk (a .txt batch: several)
    names: tuple[str, ...] = ()  # a .txt batch: each file's stable name
    member: IO[bytes] | None = None  # or an outer tarball's member, readable until the next unit is drawn
    size: int = 0  # bytes on disk (or in the outer tarball)
    source: str = ""  # the input file it comes from (an outer tarball for its members)
    error: str = ""  # kind "error": what broke


@dataclasses.dataclass(frozen=True)
class Chunk:
    """A piece of work for one worker: documents of one unit, numbered from `first` within their file."""

    unit: str
    kind: str  # lines | rows | members | archive | txt | bad
    first: int  # the file's number of the chunk's first record (line, row, member)
    data: Any  # lines: bytes; rows: list of texts; members: [(name, bytes)]; archive: path or bytes;
    #            txt: [(path, name)]; bad: the reason the rest of the unit is skipped


class Damaged(Exception):
    """The rest of a unit is unreadable; the message is the reason listed in `skipped`."""


# ----------------------------------------------------------------------------------------- finding the units


def _kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(".txt"):
        return "txt"
    return None


class _ZstdReader(io.RawIOBase):
    """zstd frames one after another, decompressed on the fly. EOFError when the input ends inside a frame:
    zstandard's own stream_reader returns a truncated stream without a word."""

    def __init__(self, raw: IO[bytes]) -> None:
        try:
            import zstandard
        except ImportError:
            raise ValueError("reading .zst needs zstandard: pip install zstandard") from None
        self._raw, self._new, self._error = raw, zstandard.ZstdDecompressor().decompressobj, zstandard.ZstdError
        self._frame, self._inside, self._out, self._pos = self._new(), False, b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos == len(self._out):
            block = self._raw.read(READ_BYTES)
            if not block:
                if self._inside:
                    raise EOFError("zstd stream ended before its end marker")
                return 0
            pieces = []
            while block:
                self._inside = True
                try:
                    pieces.append(self._frame.decompress(block))
                except self._error as err:  # corrupt data: reported like the other codecs' damage
                    raise OSError(f"zstd: {err}") from None
                block = b""
                if self._frame.eof:  # a file may hold several frames (pzstd, concatenated files)
                    block, self._frame, self._inside = self._frame.unused_data, self._new(), False
            self._out, self._pos = b"".join(pieces), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n


# magic bytes → streaming decompressor; each raises EOFError at a truncated end
_CODECS = ((b"\xfd7zXZ", lzma.open), (b"\x1f\x8b", gzip.open), (b"BZh", bz2.open),
           (b"\x28\xb5\x2f\xfd", lambda raw: io.BufferedReader(_ZstdReader(raw), READ_BYTES)))


def _decompressing(raw: IO[bytes]) -> IO[bytes]:
    """`raw` decompressed on the fly by its magic bytes (xz, gzip, bzip2, zstd, else as is)."""
    if not hasattr(raw, "peek"):
        raw = io.BufferedReader(raw)
    magic = raw.peek(6)[:6]
    opener = next((op for prefix, op in _CODECS if magic.startswith(prefix)), None)
    return opener(raw) if opener else raw


@contextlib.contextmanager
def _open_decompressed(path: Path) -> Iterator[IO[bytes]]:
    """The file, decompressed on the fly by its magic bytes. These readers raise EOFError at a truncated end,
    where tarfile's own stream mode would stop silently."""
    with open(path, "rb") as raw:
        yield _decompressing(raw)


def _is_outer_tarball(path: Path) -> bool:
    """A tarball whose members are archives or jsonl/parquet files (not .txt documents)."""
    try:
        with _open_decompressed(path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    return _kind(member.name) in ("tar", "jsonl", "parquet")
    except CORRUPT:
        return False  # read as an ordinary unit; its reader reports the damage
    return False


def _sources(inputs: Sequence[Path], bad_names: list[tuple[str, str]] | None = None) -> list[tuple[Path, str]]:
    """(file, name) pairs in a stable order: folders expanded recursively, names relative to the folder.

    A file whose name (relative to its input folder) is not valid UTF-8 is left out: names seed the holdout and
    go into the manifest, and Python can only carry such a name as a str with surrogate escapes, which cannot be
    encoded. It is appended to `bad_names` as (the name with its bytes shown as \\xNN escapes, reason).
    """
    found: list[tuple[Path, str]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p.name))
            found.extend((p, str(p.relative_to(path))) for p in files)
        elif path.is_file():
            if _kind(path.name) is None:
                raise ValueError(f"{path}: not a text input (.xz/.tar*, .jsonl[.gz|.zst], .parquet, .txt)")
            found.append((path, path.name))
        else:
            raise ValueError(f"input {path} does not exist")
    named = [(path, name) for path, name in found if _is_utf8(name)]
    if bad_names is not None:
        bad_names.extend((os.fsencode(name).decode("utf-8", errors="backslashreplace"),
                          "file name is not valid UTF-8 (rename it to include it)")
                         for _, name in found if not _is_utf8(name))
    if not named:
        left_out = len(found) - len(named)
        raise ValueError(f"no text inputs found in {', '.join(map(str, inputs))}"
                         + (f" ({left_out} left out: file names that are not valid UTF-8)" if left_out else ""))
    repeated = sorted(name for name, count in Counter(name for _, name in named).items() if count > 1)
    if repeated:  # names pick the shards and seed the holdout: they must be unique
        raise ValueError(f"several inputs hold a file named {repeated[0]!r}; give the inputs distinct file names "
                         "(or one parent folder)")
    return named


def _is_utf8(name: str) -> bool:
    """False for a file name that came from bytes that are not UTF-8 (Python holds them as lone surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def iter_units(inputs: Sequence[Path], wanted: set[str] | None = None, names_only: bool = False
               ) -> Iterator[TextUnit]:
    """Every unit in order; with `wanted`, only those (an outer tarball none of whose members is wanted is not
    read at all); with `names_only`, members of outer tarballs carry no stream (a listing pass)."""
    sources = _sources(inputs)
    txt: list[tuple[Path, str, int]] = []
    for path, name in sources:
        kind = _kind(path.name)
        if kind == "txt":
            txt.append((path, name, path.stat().st_size))
            continue
        if kind == "tar" and _is_outer_tarball(path):
            yield from _outer_tarball_units(path, name, wanted, names_only)
            continue
        if wanted is None or name in wanted:
            yield TextUnit(name, kind, (str(path),), size=path.stat().st_size, source=str(path))
    for batch in _txt_batches(txt):
        name = f"{batch[0][1]}+{len(batch)}"
        if wanted is None or name in wanted:  # sources: its paths
            yield TextUnit(name, "txt", tuple(str(p) for p, _, _ in batch), tuple(n for _, n, _ in batch))


def _txt_batches(files: list[tuple[Path, str, int]]) -> Iterator[list[tuple[Path, str, int]]]:
    """Consecutive runs of .txt files, each of at most TXT_BATCH files and CHUNK_BYTES (or one larger file)."""
    batch: list[tuple[Path, str, int]] = []
    size = 0
    for file in files:
        if batch and (len(batch) == TXT_BATCH or size + file[2] > CHUNK_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(file)
        size += file[2]
    if batch:
        yield batch


def _outer_tarball_units(path: Path, name: str, wanted: set[str] | None, names_only: bool) -> Iterator[TextUnit]:
    if wanted is not None and not any(w.startswith(name + "/") for w in wanted):
        return
    try:
        with _open_decompressed(path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                kind = _kind(member.name)
                if not member.isfile() or kind not in ("tar", "jsonl", "parquet"):
                    continue
                unit_name = f"{name}/{member.name}"
                if wanted is not None and unit_name not in wanted:
                    continue
                stream = None if names_only else tar.extractfile(member)
                yield TextUnit(unit_name, kind, member=stream, size=member.size, source=str(path))
            _drain(raw)
    except CORRUPT as err:
        # The outer archive broke off: the members read so far stand; the rest is reported as one bad unit.
        yield TextUnit(f"{name}/<after last good member>", "error", source=str(path),
                       error=f"archive damaged: {_reason(err)}")


def _drain(stream: IO[bytes]) -> None:
    """Read a stream to its end: tarfile stops at its end-of-archive blocks, and a compressed stream truncated
    after them only raises when read to its end."""
    while stream.read(READ_BYTES):
        pass


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200] or 'truncated'}"


# ---------------------------------------------------------------------- cutting units into chunks (main process)


def unit_chunks(unit: TextUnit, text_field: str) -> Iterator[Chunk]:
    """The chunks of a unit, in order, cut by content alone; a damaged unit ends with a "bad" chunk."""
    if unit.kind == "error":
        yield Chunk(unit.name, "bad", 0, unit.error)
        return
    if unit.kind == "txt":
        yield Chunk(unit.name, "txt", 0, list(zip(unit.paths, unit.names)))
        return
    count, what = 0, {"jsonl": "lines", "parquet": "rows", "tar": "documents"}[unit.kind]
    try:
        with contextlib.ExitStack() as stack:
            raw = unit.member if unit.member is not None else stack.enter_context(open(unit.paths[0], "rb"))
            if unit.kind == "tar" and unit.size <= CHUNK_BYTES:  # a small archive: one chunk, read by its worker
                yield Chunk(unit.name, "archive", 0, unit.paths[0] if unit.paths else raw.read())
                return
            if unit.kind == "jsonl":
                pieces = _line_chunks(stack.enter_context(_decompressing(raw)))
            elif unit.kind == "parquet":
                if unit.member is not None:  # parquet needs random access (its footer is at the end)
                    raw = _spooled(raw, stack)
                pieces = _row_chunks(raw, text_field)
            else:
                pieces = _member_chunks(stack.enter_context(_decompressing(raw)))
            for kind, data, records in pieces:
                yield Chunk(unit.name, kind, count, data)
                count += records
    except _parquet_errors() + CORRUPT as err:
        yield Chunk(unit.name, "bad", count, f"damaged after {count} {what}: {_reason(err)}; the rest skipped")
    except Damaged as err:
        yield Chunk(unit.name, "bad", count, str(err))


def _parquet_errors() -> tuple[type[BaseException], ...]:
    try:
        import pyarrow
    except ImportError:
        return ()
    return (pyarrow.ArrowException,)


def _line_chunks(stream: IO[bytes]) -> Iterator[tuple[str, bytes, int]]:
    """("lines", runs of whole lines of at most CHUNK_BYTES, line count). A line longer than that is a run of its
    own. Each cut depends only on the bytes from the previous cut on, never on how reads return. If the stream
    breaks, the whole lines before the break come out, then the error: the partial line is never used."""
    limit, buf, scanned = CHUNK_BYTES, bytearray(), 0
    while True:
        try:
            block = stream.read1(READ_BYTES)  # what one decompression step gives: nothing decodable is lost
        except CORRUPT:
            cut = buf.rfind(b"\n") + 1
            if cut:
                yield "lines", bytes(buf[:cut]), buf.count(b"\n", 0, cut)
            raise
        buf += block
        while len(buf) >= limit:
            cut = buf.rfind(b"\n", 0, limit) + 1 or buf.find(b"\n", max(limit, scanned)) + 1
            if not cut:  # inside a line longer than the limit: read on (and do not search this part again)
                scanned = len(buf)
                break
            yield "lines", bytes(buf[:cut]), buf.count(b"\n", 0, cut)
            del buf[:cut]
            scanned = 0
        if not block:
            if buf:  # the last line may lack its newline
                yield "lines", bytes(buf), buf.count(b"\n") + (not buf.endswith(b"\n"))
            return


def _spooled(raw: IO[bytes], stack: contextlib.ExitStack) -> IO[bytes]:
    """A copy of a stream in a temporary file (removed when `stack` closes)."""
    spool = stack.enter_context(tempfile.TemporaryFile())
    shutil.copyfileobj(raw, spool, READ_BYTES)
    spool.seek(0)
    return spool


def _row_chunks(raw: IO[bytes], text_field: str) -> Iterator[tuple[str, list[Any], int]]:
    """("rows", runs of rows holding at most CHUNK_BYTES characters, row count), read by row batches."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading parquet needs pyarrow: pip install pyarrow") from None
    parquet = pq.ParquetFile(raw)
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise Damaged(f"no column {text_field!r} (columns: {', '.join(columns)})")
    rows: list[Any] = []
    size = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            rows.append(text)
            size += len(text) if isinstance(text, str) else 0
            if size >= CHUNK_BYTES:  # decided row by row: independent of the batch boundaries
                yield "rows", rows, len(rows)
                rows, size = [], 0
    if rows:
        yield "rows", rows, len(rows)


def _tar_documents(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of each .txt member of a tar stream, each read whole; then the stream is drained so
    that a truncation after the last member is noticed too."""
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".txt"):
                yield member.name, tar.extractfile(member).read()
    _drain(stream)


def _member_chunks(stream: IO[bytes]) -> Iterator[tuple[str, list[tuple[str, bytes]], int]]:
    """("members", runs of whole .txt members holding at most CHUNK_BYTES (or one larger member), count)."""
    docs: list[tuple[str, bytes]] = []
    size = 0
    try:
        for name, data in _tar_documents(stream):
            docs.append((name, data))
            size += len(data)
            if size >= CHUNK_BYTES:
                yield "members", docs, len(docs)
                docs, size = [], 0
    except CORRUPT:
        if docs:  # the members read whole before the break stand
            yield "members", docs, len(docs)
        raise
    if docs:
        yield "members", docs, len(docs)


# ---------------------------------------------------------------------------- reading documents (the worker)


def chunk_documents(chunk: Chunk, text_field: str) -> Iterator[tuple[str, int, str, str | tuple[str]]]:
    """(file, number within the file, label, text or (reason,)) for each document of a chunk; Damaged at the end
    of a damaged unit (its documents before the damage come out first)."""
    kind, first = chunk.kind, chunk.first
    if kind == "bad":
        raise Damaged(chunk.data)
    if kind == "txt":
        for path, name in chunk.data:
            yield name, 0, name, _decode(Path(path).read_bytes())
    elif kind == "lines":
        for number, line in enumerate(chunk.data.split(b"\n"), start=first):
            if line.strip():
                yield chunk.unit, number, f"{chunk.unit}:line {number + 1}", _json_text(line, text_field)
    elif kind == "rows":
        for number, text in enumerate(chunk.data, start=first):
            yield chunk.unit, number, f"{chunk.unit}:row {number}", (
                text if isinstance(text, str) else (f"{text_field!r} is not a string",))
    elif kind == "members":
        for number, (name, data) in enumerate(chunk.data, start=first):
            yield chunk.unit, number, f"{chunk.unit}:{name}", _decode(data)
    elif kind == "archive":
        count = 0
        try:
            with contextlib.ExitStack() as stack:
                data = chunk.data
                raw = io.BytesIO(data) if isinstance(data, bytes) else stack.enter_context(open(data, "rb"))
                for name, text in _tar_documents(stack.enter_context(_decompressing(raw))):
                    yield chunk.unit, count, f"{chunk.unit}:{name}", _decode(text)
                    count += 1
        except CORRUPT as err:
            raise Damaged(f"damaged after {count} documents: {_reason(err)}; the rest skipped") from None
    else:
        raise ValueError(f"unknown chunk kind {kind!r}")


def _decode(data: bytes) -> str | tuple[str]:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        return (f"invalid UTF-8 at byte {err.start}",)


def _json_text(line: bytes, text_field: str) -> str | tuple[str]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return (f"invalid UTF-8 at byte {err.start}" if isinstance(err, UnicodeDecodeError) else "invalid JSON",)
    text = record.get(text_field) if isinstance(record, dict) else None
    return text if isinstance(text, str) else (f"no string field {text_field!r}",)


# ------------------------------------------------------------------------------------------------- the worker


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
    """What a worker needs besides the chunk and the tokenizer (sent along with each chunk: a few bytes)."""

    seq_len: int
    val_fraction: float
    seed: int
    text_field: str


def in_validation(seed: int, file: str, index: int, fraction: float) -> bool:
    """Seeded, stable assignment of document number `index` of `file` to the validation split."""
    digest = hashlib.blake2b(f"{seed}:{file}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def tokenize_chunk(chunk: Chunk, config: ChunkConfig) -> UnitResult:
    """Read, tokenize and pack one chunk (runs in a worker, with the prep's tokenizer from worker_tokenizer)."""
    tokenizer = worker_tokenizer()
    result = UnitResult()
    kept: list[tuple[str, int, str]] = []
    try:
        for file, number, label, text in chunk_documents(chunk, config.text_field):
            result.items += 1
            if isinstance(text, tuple):
                result.skipped.append((label, text[0]))
            elif text:
                kept.append((file, number, text))
            else:
                result.count("empty_documents")
    except Damaged as err:  # counted as one more bad input
        result.items += 1
        result.skipped.append((chunk.unit, str(err)))
    eos = tokenizer.info.eos
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for (file, number, _), ids in zip(kept, tokenizer.encode_batch([text for _, _, text in kept])):
        split = "val" if in_validation(config.seed, file, number, config.val_fraction) else "train"
        streams[split].extend(ids)  # list.extend runs at C speed; a per-token Python loop would not
        streams[split].append(eos)
    for split, stream in streams.items():
        if stream:
            result.add(split, pack(np.array(stream, dtype=np.int32), config.seq_len + 1))
    result.count("documents", len(kept))
    return result


# ------------------------------------------------------------------------------------------------- the prep


def prep_text(inputs: Sequence[Path], out: Path, *, tokenizer: str = "sentencepiece", vocab_size: int = 32000,
              tokenizer_model: Path | None = None, gpt2_vocab: Path | None = None, gpt2_merges: Path | None = None,
              tokenizer_sample_docs: int = 50_000, val_fraction: float = 0.0005, text_field: str = "text",
              seed: int = 1234, seq_len: int = 1024, options: PrepOptions) -> dict | None:
    """Prepare a text corpus into `out`; returns the manifest, or None when `out` already holds this prep."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1); got {val_fraction}")
    if seq_len < 1:
        raise ValueError(f"--seq-len must be positive; got {seq_len}")
    inputs = [Path(p) for p in inputs]
    bad_names: list[tuple[str, str]] = []  # files left out for their names: counted and listed, not fatal
    stamps = [file_stamp(p) for p, _ in _sources(inputs, bad_names)]
    args: dict[str, Any] = {"inputs": stamps, "tokenizer": tokenizer, "seq_len": seq_len,
                            "val_fraction": val_fraction, "text_field": text_field, "seed": seed,
                            **options.shard_args()}
    if bad_names:  # a changed set of unreadable names is a changed input
        args["unnamable_inputs"] = [name for name, _ in bad_names]
    if tokenizer == "sentencepiece":
        args.update(vocab_size=vocab_size, tokenizer_sample_docs=tokenizer_sample_docs,
                    tokenizer_model=file_stamp(tokenizer_model) if tokenizer_model else None)
    elif tokenizer == "gpt2":
        args.update(gpt2_vocab=file_stamp(Path(gpt2_vocab)) if gpt2_vocab and Path(gpt2_vocab).is_file() else None,
                    gpt2_merges=file_stamp(Path(gpt2_merges)) if gpt2_merges and Path(gpt2_merges).is_file() else None)
    else:
        raise ValueError(f"--tokenizer must be sentencepiece or gpt2; got {tokenizer!r}")
    if already_done(out, "text", args, options.overwrite):
        return None

    tok = _build_tokenizer(inputs, tokenizer, vocab_size, tokenizer_model, gpt2_vocab, gpt2_merges,
                           tokenizer_sample_docs, text_field, seed, options)
    wanted = None
    if options.num_shards > 1:
        names = [u.name for u in iter_units(inputs, names_only=True)]  # shards slice units (files), not chunks
        wanted = set(shard_slice(names, options.shard_index, options.num_shards))
    config = ChunkConfig(seq_len=seq_len, val_fraction=val_fraction, seed=seed, text_field=text_field)
    with ShardWriter(out, corpus="text", args=args, tokenizer=tok.info, seq_len=seq_len,
                     compression=options.compression) as writer:
        tok.save(writer.tokenizer_dir)
        if options.shard_index == 0:  # listed once, so that merged parts list them once, like a single prep
            writer.items += len(bad_names)
            for name, reason in bad_names:
                writer.skip(name, reason)
        sources: dict[str, None] = {}  # the input files this run read, in order

        def chunks() -> Iterator[Chunk]:
            for unit in iter_units(inputs, wanted):
                sources.update(dict.fromkeys([unit.source] if unit.source else unit.paths))
                yield from unit_chunks(unit, text_field)  # drawn lazily: at most 2×workers chunks in flight

        stats = run_units(chunks(), functools.partial(tokenize_chunk, config=config), writer, options, desc="text",
                          item="chunk")
        writer.inputs.extend(input_record(Path(p)) for p in sources)
        return writer.publish(options.max_skip_fraction, extra={"stats": stats})


def _build_tokenizer(inputs, kind, vocab_size, model, gpt2_vocab, gpt2_merges, sample_docs, text_field, seed,
                     options):
    if kind == "gpt2":
        return GPT2Tokenizer.from_files(gpt2_vocab, gpt2_merges)
    if model is not None:
        return SentencePieceTokenizer.from_file(Path(model))
    if options.num_shards > 1:
        raise ValueError("a sharded prep needs one tokenizer for all shards: train it first with "
                         "`pope prep text --input ... --out DIR` (or any prep) and pass --tokenizer-model "
                         "DIR/tokenizer/spm.model")
    sentences = _tokenizer_sample(inputs, sample_docs, text_field, seed)
    return SentencePieceTokenizer.train(sentences, vocab_size, seed=seed, threads=options.resolved_workers)


def _tokenizer_sample(inputs: Sequence[Path], sample_docs: int, text_field: str, seed: int) -> list[str]:
    """Lines of a seeded sample of units' first documents, `sample_docs` documents in all.

    Bottom-k by a seeded hash of the unit name: keep the units with the smallest hashes whose documents reach
    sample_docs, reading at most sample_docs documents of each (so a multi-GB file is not read whole). One pass,
    memory bounded by 2×sample_docs documents, the same sample whatever the order or number of inputs it meets.
    """
    rank = lambda name: hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    heap: list[tuple[bytes, str, list[str]]] = []  # max-heap by rank, through negated bytes
    total = 0
    for unit in iter_units(inputs, names_only=False):
        key = rank(unit.name)
        if heap and total >= sample_docs and key >= _neg(heap[0][0]):
            continue  # would be dropped at once
        docs = _first_documents(unit, text_field, sample_docs)
        heapq.heappush(heap, (_neg(key), unit.name, docs))
        total += len(docs)
        while heap and total - len(heap[0][2]) >= sample_docs:
            total -= len(heapq.heappop(heap)[2])
    docs = [d for _, _, unit_docs in sorted(heap, key=lambda e: _neg(e[0])) for d in unit_docs][:sample_docs]
    if not docs:
        raise ValueError("no readable document to train the tokenizer on")
    return [line for doc in docs for line in doc.split("\n") if line.strip()]


def _first_documents(unit: TextUnit, text_field: str, limit: int) -> list[str]:
    """The first `limit` non-empty documents of a unit, read chunk by chunk (those before a damage stand)."""
    docs: list[str] = []
    with contextlib.closing(unit_chunks(unit, text_field)) as chunks:
        try:
            for chunk in chunks:
                for _, _, _, text in chunk_documents(chunk, text_field):
                    if isinstance(text, str) and text:
                        docs.append(text)
                        if len(docs) == limit:
                            return docs
        except Damaged:
            pass
    return docs


def _neg(key: bytes) -> bytes:
    """Byte-wise complement: reverses the order, turning heapq's min-heap into a max-heap (its own inverse)."""
    return bytes(255 - b for b in key)


def train_text_tokenizer(inputs: Sequence[Path], model_path: Path, *, vocab_size: int = 32000,
                         tokenizer_sample_docs: int = 50_000, text_field: str = "text", seed: int = 1234,
                         workers: int = 0, **_: Any) -> Path:
    """Train the SentencePiece model a sharded prep shares (the first job of `pope prep text --slurm`).

    Takes the same keyword arguments as prep_text (the ones it does not need are ignored); the sample and the
    model are exactly those an unsharded prep would train.
    """
    sentences = _tokenizer_sample([Path(p) for p in inputs], tokenizer_sample_docs, text_field, seed)
    tokenizer = SentencePieceTokenizer.train(sentences, vocab_size, seed=seed, threads=workers or None)
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(model_path, tokenizer.model_proto)
    return model_path
