"""`pope prep genome`: a FASTA (.fa, or gzip) and optional BED intervals → DNA token samples.

With --bed (HyenaDNA's `chrom start end split` layout) every interval is tokenized whole and cut into consecutive
samples of seq_len+1 tokens. Without it every record is cut into fixed windows of k·(seq_len+1) bases (k = 6 for
kmer6, 1 for char: the bases that make one full sample where there is no N; the Nucleotide Transformer also
trains on ~6 kbp windows), each tokenized and cut the same way, and --val-chroms / --test-chroms hold whole records
out. Windows rather than whole records keep a unit of work a few Mbp whatever the chromosome, so memory stays
bounded and one chromosome spreads over every worker. Samples made only of N are dropped (counted in the stats).

The main process streams the FASTA one record at a time and sends slices of it (≤ UNIT_BASES bases) to the
workers. Output order is the FASTA's record order, then the BED's row order (or window order): a first pass over
the headers fixes that order up front, so `--shard-index i --num-shards n` can take a contiguous block of it (BED
rows, or records without a BED) and the merged parts equal a single prep.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import IO, Iterator, NamedTuple, Sequence

import numpy as np

from data_prep.contract import token_dtype
from data_prep.parallel import PrepOptions, UnitResult, pack, run_units, shard_slice, worker_tokenizer
from data_prep.shards import ShardWriter, already_done, file_stamp, input_record
from data_prep.tokenizers.dna import count_non_acgtn, dna_tokenizer

UNIT_BASES = 1 << 22  # bases per unit of work (4 Mbp): large enough to amortise the pool, small for memory
BED_SPLITS = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test"}
_WHITESPACE = b" \t\r\n\v\f"  # removed from sequence lines: CRLF files, trailing spaces


class FastaError(ValueError):
    """A FASTA that cannot be read on (truncated or corrupt gzip, not a FASTA at all)."""


class BedRow(NamedTuple):
    where: str  # "file:line", for the skip list
    chrom: str
    start: int
    end: int
    split: str  # train, val or test
    error: str | None  # why the row is malformed, or None


class Unit(NamedTuple):
    """What a worker gets: intervals to tokenize, plus the items and skips they stand for (kept in order)."""

    seq_len: int
    intervals: list[tuple[str, bytes]]  # (split, bases)
    items: int
    skipped: list[tuple[str, str]]


def prep_genome(fasta: Path, out: Path, *, bed: Path | None, tokenizer: str, val_chroms: list[str],
                test_chroms: list[str], seq_len: int = 1000, options: PrepOptions) -> dict | None:
    """Prepare a genome into DIR/{train,val,test}; returns the manifest, or None when DIR already is this prep."""
    fasta, out, bed = Path(fasta), Path(out), Path(bed) if bed is not None else None
    tok = dna_tokenizer(tokenizer)
    val, test = sorted(set(val_chroms or [])), sorted(set(test_chroms or []))
    if seq_len < 1:
        raise ValueError(f"--seq-len must be at least 1; got {seq_len}")
    if bed is None and not val:
        raise ValueError("without --bed, name the records to hold out for validation with --val-chroms "
                         "(e.g. --val-chroms chr21)")
    if bed is not None and (val or test):
        raise ValueError("--val-chroms/--test-chroms apply only without --bed (the BED's split column decides)")
    if set(val) & set(test):
        raise ValueError(f"records in both --val-chroms and --test-chroms: {', '.join(sorted(set(val) & set(test)))}")
    args = {"fasta": file_stamp(fasta), "bed": file_stamp(bed) if bed else None, "tokenizer": tokenizer,
            "seq_len": seq_len, "val_chroms": val, "test_chroms": test, **options.shard_args()}
    if already_done(out, "genome", args, options.overwrite):
        return None

    names, failure = fasta_names(fasta)  # the first pass: record order, for sharding and checks
    window = tok.k * (seq_len + 1)
    if bed is None:
        missing = sorted(set(val + test) - set(names))
        if missing and names and failure is None:  # (no names at all: reported as not a FASTA below)
            raise ValueError(f"--val-chroms/--test-chroms name records not in {fasta.name}: {', '.join(missing)} "
                             f"(it has {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
        splits = {**{n: "val" for n in val}, **{n: "test" for n in test}}
        # a FASTA without a single header still counts as one item, so shard 0 reports it
        mine = shard_slice(range(max(len(names), 1)), options.shard_index, options.num_shards)
        units = _window_units(fasta, seq_len, window, splits, mine.start, mine.stop)
    else:
        rank = {name: i for i, name in reversed(list(enumerate(names)))}  # first record of a name wins
        # malformed rows first, then by chromosome in FASTA order, unknown chromosomes last; file order within
        rows = sorted(read_bed(bed), key=lambda row: -1 if row.error else rank.get(row.chrom, len(rank)))
        units = _bed_units(fasta, seq_len, shard_slice(rows, options.shard_index, options.num_shards))

    with ShardWriter(out, corpus="genome", args=args, tokenizer=tok.info, seq_len=seq_len,
                     compression=options.compression) as writer:
        stats = run_units(units, _work, writer, options, desc=f"genome {fasta.name}")
        writer.inputs = [input_record(fasta)] + ([input_record(bed)] if bed else [])
        return writer.publish(options.max_skip_fraction, extra={
            "stats": stats, "mode": "bed" if bed else "windows", "window_bases": None if bed else window})


def _work(unit: Unit) -> UnitResult:
    """Tokenize each interval, cut it into samples of seq_len+1 tokens, drop the samples made only of N."""
    tok = worker_tokenizer()
    dtype = token_dtype(tok.info.vocab_size)
    result = UnitResult(items=unit.items, skipped=list(unit.skipped))
    for split, bases in unit.intervals:
        result.count("intervals")
        result.count("bases", len(bases))
        result.count("non_acgtn_bases", count_non_acgtn(bases))  # read as N
        samples = pack(tok.encode(bases).astype(dtype), unit.seq_len + 1)
        kept = [s for s in samples if not np.all(s == tok.n_id)]
        result.count("all_n_samples_dropped", len(samples) - len(kept))
        if kept:
            result.add(split, kept)
    return result


def _window_units(fasta: Path, seq_len: int, window: int, splits: dict[str, str], first: int,
                  stop: int) -> Iterator[Unit]:
    """Records first..stop-1 of the FASTA cut into windows of `window` bases, about UNIT_BASES to a unit (small
    records share one)."""
    intervals: list[tuple[str, bytes]] = []
    skipped: list[tuple[str, str]] = []
    size = items = count = 0  # count: records read completely
    try:
        for name, seq in read_fasta(fasta):
            if count >= first:
                items += 1  # the record is one item, even when it is empty
                split = splits.get(name, "train")
                for start in range(0, len(seq), window):
                    intervals.append((split, seq[start:start + window]))
                    size += window
                    if size >= UNIT_BASES:
                        yield Unit(seq_len, intervals, items, [])
                        intervals, size, items = [], 0, 0
            count += 1
            if count >= stop:
                break
    except FastaError as err:
        if first <= count < stop:  # the record that failed is this shard's to report
            items, skipped = items + 1, [(str(fasta), str(err))]
    if intervals or items:
        yield Unit(seq_len, intervals, items, skipped)


def _bed_units(fasta: Path, seq_len: int, rows: Sequence[BedRow]) -> Iterator[Unit]:
    """The intervals of `rows`, chromosome by chromosome in FASTA order; malformed rows first, unknown ones last."""
    by_chrom: dict[str, list[BedRow]] = {}
    bad = [(row.where, row.error) for row in rows if row.error]
    for row in rows:
        if not row.error:
            by_chrom.setdefault(row.chrom, []).append(row)
    if bad:
        yield Unit(seq_len, [], len(bad), bad)
    failure = None
    try:
        for name, seq in read_fasta(fasta):
            intervals, size, skipped = [], 0, []
            for row in by_chrom.pop(name, []):
                if row.end > len(seq):
                    skipped.append((row.where, f"{row.chrom}:{row.start}-{row.end} ends beyond {row.chrom} "
                                                f"(length {len(seq):,})"))
                    continue
                intervals.append((row.split, seq[row.start:row.end]))
                size += row.end - row.start
                if size >= UNIT_BASES:
                    yield Unit(seq_len, intervals, len(intervals) + len(skipped), skipped)
                    intervals, size, skipped = [], 0, []
            if intervals or skipped:
                yield Unit(seq_len, intervals, len(intervals) + len(skipped), skipped)
            if not by_chrom:
                break  # every interval found: the rest of the FASTA is not needed
    except FastaError as err:
        failure = str(err)
    lost = [(row.where, f"chromosome {row.chrom!r} not read: {failure}" if failure
             else f"chromosome {row.chrom!r} is not in {fasta.name}")
            for chrom_rows in by_chrom.values() for row in chrom_rows]
    if lost:
        yield Unit(seq_len, [], len(lost), lost)


def read_bed(path: Path) -> list[BedRow]:
    """The data rows of `chrom start end split` BED (tabs or spaces); malformed rows carry their error.

    Blank lines, `#` comments, `track`/`browser` lines and a header line are not rows. A header (HyenaDNA's BED
    starts with `chrom start end split`, without '#') is told apart from a malformed first row by having no digit
    in its start and end columns: `chrom start end split` is a header, `chr1 12x 500 train` a malformed row
    (counted and listed like any other).
    """
    rows: list[BedRow] = []
    first = True  # the first line that is not blank, a comment or a track/browser line
    with _open(path) as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.decode("utf-8", errors="replace").strip()
            if not line or line.startswith(("#", "track ", "browser ")) or line in ("track", "browser"):
                continue
            fields, where = line.split(), f"{path}:{number}"
            if first:
                first = False
                if _is_bed_header(fields):
                    continue
            if len(fields) < 4:
                rows.append(BedRow(where, "", 0, 0, "", f"expected `chrom start end split`, got {len(fields)} fields"))
                continue
            chrom, start, end, split = fields[:4]
            if not (start.isdecimal() and end.isdecimal()):
                rows.append(BedRow(where, chrom, 0, 0, "", f"start and end must be whole numbers; got {start} {end}"))
            elif split.lower() not in BED_SPLITS:
                rows.append(BedRow(where, chrom, 0, 0, "", f"unknown split {split!r} (expected train, valid or test)"))
            elif int(start) >= int(end):
                rows.append(BedRow(where, chrom, 0, 0, "", f"empty interval {start}-{end}"))
            else:
                rows.append(BedRow(where, chrom, int(start), int(end), BED_SPLITS[split.lower()], None))
    return rows


def _is_bed_header(fields: list[str]) -> bool:
    """Column names, not data: at least three fields, and no digit in the start and end columns (`start end`,
    `chromStart chromEnd`). A row with a number there, however garbled (`12x`), is data."""
    return len(fields) >= 3 and not any(c.isdigit() for field in fields[1:3] for c in field)


def read_fasta(path: Path, block: int = 1 << 24) -> Iterator[tuple[str, bytes]]:
    """(name, bases) of each record, whitespace removed, letters as in the file; one record in memory at a time.

    The name is the header's first word. Raises FastaError where the file stops being readable (a record is only
    yielded once its end is read, so every record yielded is complete).
    """
    name, pieces = None, []
    try:
        for header, piece in _fasta_pieces(path, block):
            if header is None:
                pieces.append(piece)
                continue
            if name is not None:
                yield name, b"".join(pieces).translate(None, _WHITESPACE)
            name, pieces = header, []
        if name is None:
            raise FastaError(f"{path.name} has no '>' header: empty, or not a FASTA file")
        yield name, b"".join(pieces).translate(None, _WHITESPACE)
    except (OSError, EOFError, zlib.error) as err:  # truncated or corrupt gzip, unreadable file
        at = f" in record {name!r}" if name is not None else ""
        raise FastaError(f"{path.name} is unreadable{at} ({type(err).__name__}: {err}); that record and any after "
                         "it are missing") from None


def fasta_names(path: Path) -> tuple[list[str], str | None]:
    """The record names in file order (no sequence kept), and why reading stopped early, if it did."""
    names: list[str] = []
    try:
        names.extend(header for header, _ in _fasta_pieces(path) if header is not None)
    except (OSError, EOFError, zlib.error, FastaError) as err:
        return names, f"{type(err).__name__}: {err}"
    return names, None


def _fasta_pieces(path: Path, block: int = 1 << 24) -> Iterator[tuple[str | None, bytes]]:
    """(name, b"") at each header line and (None, bytes) for the sequence text between, in file order.

    Works on large blocks and finds headers with bytes.find: reading line by line costs ~1 µs a line in Python,
    minutes for the 50M lines of a human genome. A header is a '>' at the start of a line.
    """
    carry, at_line_start, named = b"", True, False
    with _open(path) as handle:
        # read1: at most one underlying read per call, so what was read before a truncation is not lost
        while chunk := handle.read1(block):
            data, carry = carry + chunk, b""
            start = 0
            while start < len(data):
                if data.startswith(b">", start) and (start > 0 or at_line_start):
                    header = start
                else:
                    header = data.find(b"\n>", start)
                    header = header + 1 if header >= 0 else len(data)
                if header > start:
                    if not named and data[start:header].strip():
                        raise FastaError(f"{path.name} has no '>' header before its sequence: not a FASTA file")
                    yield None, data[start:header]
                if header == len(data):
                    break
                end = data.find(b"\n", header)
                if end < 0:  # the header line goes on in the next block
                    carry = data[header:]
                    break
                named = True
                yield _header_name(data[header:end]), b""
                start = end + 1
            at_line_start = bool(carry) or data.endswith(b"\n")  # a carried header begins a line
        if carry:  # a last header line without a newline
            yield _header_name(carry), b""


def _header_name(line: bytes) -> str:
    fields = line[1:].split(maxsplit=1)
    return fields[0].decode("utf-8", errors="replace") if fields else ""


def _open(path: Path) -> IO[bytes]:
    """A binary reader of a plain or gzip-compressed file (told by its magic bytes, not its name)."""
    with open(path, "rb") as handle:
        magic = handle.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")
