"""Web text (OpenWebText and friends) → packed token sequences.

Inputs, in the forms users hold OpenWebText in:
- the original release: a tarball (`openwebtext.tar.xz`) of `urlsf_subset*.xz` archives, or a folder of them; each
  subset is an xz-compressed tar of .txt files, one document per file;
- `.jsonl`, `.jsonl.gz`, `.jsonl.zst` with a `text` field (one document per line);
- `.parquet` with a `text` column (a Hugging Face export);
- a folder of `.txt` files, one document per file.

Work is cut into *units* (one subset archive, one jsonl or parquet file, a batch of 512 .txt files). Documents of a
unit are tokenized, each followed by EOS, and packed into samples of seq_len+1 tokens; packing restarts at each
unit, so a sharded prep merges into exactly the single prep. A seeded hash of (unit, document index) sends
--val-fraction of the documents to the validation split. A document that is not valid UTF-8 (or a jsonl line that
is not JSON) is skipped and listed; a unit whose container is damaged (a truncated xz or gzip stream, a corrupt
parquet file) is skipped whole and listed, since a partial read would depend on where it broke.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import hashlib
import heapq
import io
import json
import lzma
import os
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from data_prep.parallel import PrepOptions, UnitResult, pack, run_units, shard_slice
from data_prep.shards import ShardWriter, already_done, file_stamp, input_record
from data_prep.tokenizers.text import GPT2Tokenizer, SentencePieceTokenizer

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".xz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz")
TXT_BATCH = 512  # .txt files per unit
CORRUPT = (tarfile.TarError, lzma.LZMAError, EOFError, zlib.error, OSError, gzip.BadGzipFile)


@dataclasses.dataclass(frozen=True)
class TextUnit:
    """One unit of work; `name` is stable across machines (relative to its input) and seeds the holdout."""

    name: str
    kind: str  # tar | jsonl | parquet | txt
    paths: tuple[str, ...] = ()  # read from disk by the worker
    data: bytes | None = None  # or carried from an outer tarball by the main process
    source: str = ""  # the input file it comes from (an outer tarball for its members)


class UnreadableUnit(Exception):
    """The unit's container is damaged; the whole unit is skipped."""


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


# magic bytes → (streaming opener, whole-buffer decompressor); both raise on a truncated stream
_CODECS = ((b"\xfd7zXZ", lzma.open, lzma.decompress), (b"\x1f\x8b", gzip.open, gzip.decompress),
           (b"BZh", bz2.open, bz2.decompress))


def _open_decompressed(path: Path) -> io.BufferedIOBase:
    """The file, decompressed on the fly by its magic bytes (xz, gzip, bzip2, else as is). These readers raise
    EOFError at a truncated end, where tarfile's own stream mode would stop silently."""
    with open(path, "rb") as handle:
        magic = handle.read(6)
    opener = next((op for prefix, op, _ in _CODECS if magic.startswith(prefix)), None)
    return opener(path) if opener else open(path, "rb")


def _decompressed_bytes(data: bytes) -> bytes:
    """Whole-buffer decompression by magic bytes (xz, gzip, bzip2, zstd); raises on a truncated stream."""
    for prefix, _, decompress in _CODECS:
        if data.startswith(prefix):
            return decompress(data)
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        try:
            import zstandard
        except ImportError:
            raise ValueError("reading .zst needs zstandard: pip install zstandard") from None
        stream = zstandard.ZstdDecompressor().decompressobj()
        out = stream.decompress(data)
        if not stream.eof:
            raise EOFError("zstd stream ended before its end marker")
        return out
    return data


def _is_outer_tarball(path: Path) -> bool:
    """A tarball whose members are archives or jsonl/parquet files (not .txt documents)."""
    try:
        with _open_decompressed(path) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for member in tar:
                if member.isfile():
                    return _kind(member.name) in ("tar", "jsonl", "parquet")
    except CORRUPT:
        return False  # read as an ordinary unit; the worker reports the damage
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
    read at all); with `names_only`, members of outer tarballs carry no data (a listing pass)."""
    sources = _sources(inputs)
    txt: list[tuple[Path, str]] = []
    for path, name in sources:
        kind = _kind(path.name)
        if kind == "txt":
            txt.append((path, name))
            continue
        if kind == "tar" and _is_outer_tarball(path):
            yield from _outer_tarball_units(path, name, wanted, names_only)
            continue
        if wanted is None or name in wanted:
            yield TextUnit(name, kind, (str(path),), source=str(path))
    for start in range(0, len(txt), TXT_BATCH):
        batch = txt[start:start + TXT_BATCH]
        name = f"{batch[0][1]}+{len(batch)}"
        if wanted is None or name in wanted:
            yield TextUnit(name, "txt", tuple(str(p) for p, _ in batch))  # sources: its paths


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
                data = None if names_only else tar.extractfile(member).read()
                yield TextUnit(unit_name, kind, data=data, source=str(path))
    except CORRUPT as err:
        # The outer archive broke off: the members read so far stand; the rest is reported as one bad unit.
        yield TextUnit(f"{name}/<after last good member>", "error", data=str(err).encode(), source=str(path))


# ------------------------------------------------------------------------------------------ reading documents


def read_documents(unit: TextUnit, text_field: str) -> tuple[list[str], list[tuple[str, str]], int]:
    """(documents, skipped (name, reason), documents seen) of a unit; UnreadableUnit if its container is damaged."""
    if unit.kind == "error":
        raise UnreadableUnit(f"archive damaged: {unit.data.decode()}")
    docs: list[str] = []
    skipped: list[tuple[str, str]] = []
    seen = 0
    try:
        for doc_name, raw in _raw_documents(unit, text_field):
            seen += 1
            if isinstance(raw, str):
                docs.append(raw)
            else:
                skipped.append((f"{unit.name}:{doc_name}", raw[0]))
    except UnreadableUnit:
        raise
    except CORRUPT as err:
        raise UnreadableUnit(f"{type(err).__name__}: {' '.join(str(err).split()) or 'truncated'}") from None
    return docs, skipped, seen


def _decode(data: bytes) -> str | tuple[str]:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        return (f"invalid UTF-8 at byte {err.start}",)


def _raw_documents(unit: TextUnit, text_field: str) -> Iterator[tuple[str, str | tuple[str]]]:
    """(document name, text) or (document name, (reason,)) for each document of the unit."""
    if unit.kind == "txt":
        for path in unit.paths:
            yield Path(path).name, _decode(Path(path).read_bytes())
    elif unit.kind == "tar":
        yield from _tar_documents(unit)
    elif unit.kind == "jsonl":
        yield from _jsonl_documents(unit, text_field)
    elif unit.kind == "parquet":
        yield from _parquet_documents(unit, text_field)
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")


def _unit_bytes(unit: TextUnit) -> bytes:
    """The unit's whole content, decompressed. A unit is read completely before any document is used, so that a
    damaged tail discards the unit rather than half of it (units are small: one subset, one file)."""
    return _decompressed_bytes(unit.data if unit.data is not None else Path(unit.paths[0]).read_bytes())


def _tar_documents(unit: TextUnit) -> Iterator[tuple[str, str | tuple[str]]]:
    docs = []
    with tarfile.open(fileobj=io.BytesIO(_unit_bytes(unit)), mode="r:") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".txt"):
                docs.append((member.name, tar.extractfile(member).read()))
    for name, data in docs:
        yield name, _decode(data)


def _jsonl_documents(unit: TextUnit, text_field: str) -> Iterator[tuple[str, str | tuple[str]]]:
    lines = _unit_bytes(unit).split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            reason = f"invalid UTF-8 at byte {err.start}" if isinstance(err, UnicodeDecodeError) else "invalid JSON"
            yield f"line {number}", (reason,)
            continue
        text = record.get(text_field) if isinstance(record, dict) else None
        yield f"line {number}", text if isinstance(text, str) else (f"no string field {text_field!r}",)


def _parquet_documents(unit: TextUnit, text_field: str) -> Iterator[tuple[str, str | tuple[str]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("reading parquet needs pyarrow: pip install pyarrow") from None
    import pyarrow

    try:
        with io.BytesIO(unit.data) if unit.data is not None else open(unit.paths[0], "rb") as raw:
            parquet = pq.ParquetFile(raw)
            columns = parquet.schema_arrow.names
            if text_field not in columns:
                raise UnreadableUnit(f"no column {text_field!r} (columns: {', '.join(columns)})")
            table = parquet.read(columns=[text_field])
    except (pyarrow.ArrowException, OSError) as err:
        raise UnreadableUnit(f"corrupt parquet: {' '.join(str(err).split())[:200]}") from None
    for row, text in enumerate(table.column(text_field).to_pylist()):
        yield f"row {row}", text if isinstance(text, str) else (f"{text_field!r} is not a string",)


# ------------------------------------------------------------------------------------------------- the worker


_STATE: dict[str, Any] = {}


def _init_worker(tokenizer_kind: str, tokenizer_blob: bytes | str, config: dict[str, Any]) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
    _STATE["tokenizer"] = _tokenizer_from_blob(tokenizer_kind, tokenizer_blob)
    _STATE.update(config)


def _tokenizer_from_blob(kind: str, blob: bytes | str) -> SentencePieceTokenizer | GPT2Tokenizer:
    return SentencePieceTokenizer(blob) if kind == "sentencepiece" else GPT2Tokenizer(blob)


def in_validation(seed: int, unit: str, index: int, fraction: float) -> bool:
    """Seeded, stable assignment of document `index` of `unit` to the validation split."""
    digest = hashlib.blake2b(f"{seed}:{unit}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def tokenize_unit(unit: TextUnit) -> UnitResult:
    """Read, tokenize and pack one unit (runs in a worker; the tokenizer comes from _init_worker)."""
    tokenizer, seq_len = _STATE["tokenizer"], _STATE["seq_len"]
    result = UnitResult()
    try:
        docs, skipped, seen = read_documents(unit, _STATE["text_field"])
    except UnreadableUnit as err:
        result.items, result.skipped = 1, [(unit.name, str(err))]
        return result
    result.items, result.skipped = seen, skipped
    eos = tokenizer.info.eos
    streams: dict[str, list[int]] = {"train": [], "val": []}
    kept = [(i, d) for i, d in enumerate(docs) if d]
    result.count("empty_documents", len(docs) - len(kept))
    for (index, _), ids in zip(kept, tokenizer.encode_batch([d for _, d in kept])):
        split = "val" if in_validation(_STATE["seed"], unit.name, index, _STATE["val_fraction"]) else "train"
        streams[split].extend(ids)  # list.extend runs at C speed; a per-token Python loop would not
        streams[split].append(eos)
    for split, stream in streams.items():
        if stream:
            result.add(split, pack(np.array(stream, dtype=np.int32), seq_len + 1))
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
        names = [u.name for u in iter_units(inputs, names_only=True)]
        wanted = set(shard_slice(names, options.shard_index, options.num_shards))
    blob = tok.model_proto if isinstance(tok, SentencePieceTokenizer) else tok.tokenizer_json
    config = {"seq_len": seq_len, "val_fraction": val_fraction, "seed": seed, "text_field": text_field}
    with ShardWriter(out, corpus="text", args=args, tokenizer=tok.info, seq_len=seq_len,
                     compression=options.compression) as writer:
        tok.save(writer.tokenizer_dir)
        if options.shard_index == 0:  # listed once, so that merged parts list them once, like a single prep
            writer.items += len(bad_names)
            for name, reason in bad_names:
                writer.skip(name, reason)
        sources: dict[str, None] = {}  # the input files this run read, in order

        def units() -> Iterator[TextUnit]:
            for unit in iter_units(inputs, wanted):
                sources.update(dict.fromkeys([unit.source] if unit.source else unit.paths))
                yield unit

        stats = run_units(units(), tokenize_unit, writer, options, total=len(wanted) if wanted is not None else None,
                          initializer=_init_worker, initargs=(tokenizer, blob, config), desc="text")
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
    """Lines of a seeded sample of whole units holding at least `sample_docs` documents.

    Bottom-k by a seeded hash of the unit name: keep the units with the smallest hashes whose documents reach
    sample_docs. One pass, bounded memory, the same sample whatever the order or number of inputs it meets.
    """
    rank = lambda name: hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    heap: list[tuple[bytes, str, list[str]]] = []  # max-heap by rank, through negated bytes
    total = 0
    for unit in iter_units(inputs, names_only=False):
        key = rank(unit.name)
        if heap and total >= sample_docs and key >= _neg(heap[0][0]):
            continue  # would be dropped at once
        try:
            docs = [d for d in read_documents(unit, text_field)[0] if d]
        except UnreadableUnit:
            continue
        heapq.heappush(heap, (_neg(key), unit.name, docs))
        total += len(docs)
        while heap and total - len(heap[0][2]) >= sample_docs:
            total -= len(heapq.heappop(heap)[2])
    docs = [d for _, _, unit_docs in sorted(heap, key=lambda e: _neg(e[0])) for d in unit_docs][:sample_docs]
    if not docs:
        raise ValueError("no readable document to train the tokenizer on")
    return [line for doc in docs for line in doc.split("\n") if line.strip()]


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
    tmp = model_path.with_suffix(".tmp")
    tmp.write_bytes(tokenizer.model_proto)
    os.replace(tmp, model_path)
    return model_path
