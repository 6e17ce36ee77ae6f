"""`pope prep midi`: a folder of MIDI files → REMI tokens in MDS shards (corpus "midi").

Every .mid/.midi under the folder, sorted by relative path. Splits follow a MAESTRO CSV at the folder's top level
(columns `split` train/validation/test and `midi_filename`; files it does not list are left out and counted), else
a seeded 90/5/5 split by file (at least one val and one test file once there are three). Byte-identical files are
removed (the first in sorted order is kept; the rest counted as `duplicates`). Each file → REMI ids
(data_prep.tokenizers.music.REMITokenizer, vocab 328), BOS + ids + EOS, cut into consecutive samples of seq_len+1
tokens. Train files are written 2·transpose+1 times, shifted by −transpose..+transpose semitones (in that order); a
shift that would push a note out of 21..108 is left out for that file (counted as `transpositions_skipped`), as
miditok's own augmentation does, rather than silently dropping notes. Notes outside 21..108 in the file itself are
dropped by miditok before any shift. A file symusic cannot read, or one without a note, is skipped and listed.

`--shard-index/--num-shards` take a contiguous block of the ordered files, so merging the parts equals one prep;
the output does not depend on the number of workers. Every part records the inputs it read (the CSV in each part;
merge_parts keeps one record a path).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep.parallel import PrepOptions, UnitResult, pack, run_units, shard_slice, worker_tokenizer
from data_prep.shards import ShardWriter, already_done, file_stamp, hash_file, input_record
from data_prep.tokenizers.music import REMITokenizer

MAESTRO_SPLITS = {"train": "train", "validation": "val", "test": "test"}
MIDI_SUFFIXES = (".mid", ".midi")
SEEDED_FRACTIONS = (0.90, 0.05, 0.05)  # train, val, test without a CSV



@dataclasses.dataclass(frozen=True)
class MidiUnit:
    """One MIDI file and what to do with it."""

    path: str  # absolute
    name: str  # relative to the input folder (posix): the name in the manifest
    digest: str  # blake2b of its bytes
    split: str | None  # train/val/test; None: not in the CSV's list
    duplicate_of: str | None  # an earlier file with the same bytes
    shifts: tuple[int, ...]  # semitone shifts to write (train: -t..t, else 0)
    seq_len: int


def midi_unit(unit: MidiUnit) -> UnitResult:
    """Worker: one file → REMI samples of each of its versions, or a skip with the reason."""
    result = UnitResult(inputs=[input_record(Path(unit.path), unit.digest)])
    if unit.duplicate_of is not None:
        result.count("duplicates")
        return result
    if unit.split is None:
        result.count("not_in_csv")
        return result
    result.items = 1
    tokenizer = worker_tokenizer()  # loaded from the file the prep saved, in every worker
    try:
        import symusic

        score = symusic.Score(unit.path)
        notes_in = sum(track.note_num() for track in score.tracks if not track.is_drum)
        prepared = tokenizer.prepare(score)
    except Exception as err:  # noqa: BLE001 - whatever a corrupt file raises, it is skipped and reported
        result.skipped.append((unit.name, f"unreadable MIDI: {err}"))
        return result
    pitches = [note.pitch for track in prepared.tracks for note in track.notes]
    if not pitches:
        result.skipped.append((unit.name, f"no notes in the pitch range {tokenizer.pitch_range}"))
        return result
    low, high = tokenizer.pitch_range
    bos, eos = tokenizer.info.bos, tokenizer.info.eos
    kept = [shift for shift in unit.shifts if low <= min(pitches) + shift and max(pitches) + shift <= high]
    try:
        streams = [tokenizer.encode_prepared(prepared.shift_pitch(shift) if shift else prepared) for shift in kept]
    except Exception as err:  # noqa: BLE001 - miditok refusing a file skips that file, not the prep
        result.skipped.append((unit.name, f"REMI encoding failed: {err}"))
        return result
    for ids in streams:
        result.add(unit.split, pack(np.concatenate([[bos], ids, [eos]]), unit.seq_len + 1))
    result.count("versions", len(kept))
    result.count("transpositions_skipped", len(unit.shifts) - len(kept))
    result.count("files")
    result.count("notes", len(pitches))
    result.count("notes_dropped", notes_in - len(pitches))  # out of range, or exact duplicates (miditok)
    return result


def find_midi_files(folder: Path) -> list[str]:
    """Relative posix paths of every .mid/.midi file under `folder`, sorted (not in listing order)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.suffix.lower() in MIDI_SUFFIXES and p.is_file())


def find_maestro_csv(folder: Path) -> Path | None:
    """The CSV at the top of `folder` with MAESTRO's `split` and `midi_filename` columns, if there is one."""
    found = []
    for path in sorted(folder.glob("*.csv")):
        with open(path, newline="") as handle:
            header = next(csv.reader(handle), [])
        if {"split", "midi_filename"} <= set(header):
            found.append(path)
    if len(found) > 1:
        raise ValueError(f"{folder} holds several MAESTRO-style CSVs ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def read_maestro_csv(path: Path) -> dict[str, str]:
    """midi_filename → our split (train/val/test) from a MAESTRO CSV."""
    splits = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] not in MAESTRO_SPLITS:
                raise ValueError(f"{path}: split {row['split']!r} of {row['midi_filename']} is not one of "
                                 f"{', '.join(MAESTRO_SPLITS)}")
            splits[Path(row["midi_filename"]).as_posix()] = MAESTRO_SPLITS[row["split"]]
    return splits


def seeded_split(names: Sequence[str], seed: int) -> dict[str, str]:
    """name → train/val/test, 90/5/5 by a seeded permutation of the sorted names (at least one val and one test
    file once there are three), so it depends on the set of files only."""
    ordered = sorted(names)
    held = 0 if len(ordered) < 3 else max(1, round(SEEDED_FRACTIONS[1] * len(ordered)))
    perm = np.random.default_rng(seed).permutation(len(ordered))
    split = {ordered[i]: "train" for i in perm}
    split.update({ordered[i]: "val" for i in perm[:held]})
    split.update({ordered[i]: "test" for i in perm[held:2 * held]})
    return split


def midi_units(folder: Path, names: Sequence[str], digests: Sequence[str], splits: dict[str, str],
               transpose: int, seq_len: int) -> list[MidiUnit]:
    """One unit per file in sorted order; duplicates point at the first file with their bytes."""
    first: dict[str, str] = {}
    units = []
    for name, digest in zip(names, digests):
        original = first.setdefault(digest, name)
        split = splits.get(name)
        shifts = tuple(range(-transpose, transpose + 1)) if split == "train" else (0,)
        units.append(MidiUnit(str(folder / name), name, digest, split, None if original == name else original,
                              shifts, seq_len))
    return units


def prep_midi(input: Path, out: Path, *, transpose: int = 3, seed: int = 1234, seq_len: int = 2048,
              options: PrepOptions) -> dict | None:
    """Prepare a folder of MIDI files as REMI tokens; see the module docstring. Returns the manifest, or None when
    `out` already holds this prep."""
    try:
        import miditok  # noqa: F401 - fail early, before hashing, when the data extra is missing
        import symusic  # noqa: F401
    except ImportError:
        raise ValueError("pope prep midi needs miditok and symusic: pip install 'pope-pretrain[data]'") from None
    input = Path(input)
    if not input.is_dir():
        raise ValueError(f"MIDI folder {input} does not exist")
    if transpose < 0:
        raise ValueError(f"--transpose must be >= 0; got {transpose}")
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1; got {seq_len}")
    names = find_midi_files(input)
    if not names:
        raise ValueError(f"no .mid/.midi file under {input}")
    table = find_maestro_csv(input)
    stamps = json.dumps([file_stamp(input / name) for name in names]).encode()
    tokenizer = REMITokenizer()
    args = {"input": str(input.resolve()), "num_files": len(names), "files": hashlib.sha256(stamps).hexdigest(),
            "csv": file_stamp(table) if table else None, "transpose": transpose, "seed": seed, "seq_len": seq_len,
            "tokenizer": {"kind": "remi", "vocab_size": tokenizer.info.vocab_size}, **options.shard_args()}
    if already_done(out, "midi", args, options.overwrite):
        return None
    # Every part hashes every file: duplicates and the seeded split are decided on the whole folder.
    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(hash_file, [input / name for name in names]))
    first_of: dict[str, str] = {}
    for digest, name in zip(digests, names):
        first_of.setdefault(digest, name)
    if table:
        listed = read_maestro_csv(table)
        splits = {name: listed[name] for name in names if name in listed}
        if not splits:
            raise ValueError(f"none of the {len(names)} MIDI files under {input} is listed in {table.name}")
    else:
        splits = seeded_split(list(first_of.values()), seed)  # duplicates do not shift the split
    units = shard_slice(midi_units(input, names, digests, splits, transpose, seq_len), options.shard_index,
                        options.num_shards)
    with ShardWriter(out, corpus="midi", args=args, tokenizer=tokenizer.info, seq_len=seq_len,
                     compression=options.compression) as writer:
        tokenizer.save(writer.tokenizer_dir)
        if table:
            writer.inputs.append(input_record(table))
        stats = run_units(units, midi_unit, writer, options, total=len(units), desc="midi")
        split_source = f"csv:{table.name}" if table else f"seeded {'/'.join(f'{f:g}' for f in SEEDED_FRACTIONS)}"
        return writer.publish(options.max_skip_fraction, extra={"stats": stats, "split_source": split_source,
                                                                "transpose": transpose})
