"""`pope prep jsb`: the JSB chorales → MDS shards (corpus "jsb").

Input: the 16th-note JSON (keys train/valid/test → our train/val/test), or the same built from music21's chorales
(see data_prep.music21_chorales). Each piece is written in raster order with the 90-id vocabulary of
data_prep.tokenizers.music (four tokens a time step, soprano..bass) and cut into consecutive, non-overlapping
windows of whole time steps: 4·⌊(seq_len+1)/4⌋ tokens (2048 for seq_len 2048), the last one shorter. A window never
spans two pieces. A piece with a pitch outside 21..108 (or a malformed step) is skipped and listed in the manifest
with the reason.

`--shard-index/--num-shards` take a contiguous block of the ordered pieces, so merging the parts equals one prep;
the output does not depend on the number of workers. Every part records the JSON it read (merge_parts keeps one
record a path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data_prep.parallel import PrepOptions, UnitResult, run_units, shard_slice, worker_tokenizer
from data_prep.shards import ShardWriter, already_done, file_stamp, input_record
from data_prep.tokenizers.music import JSBTokenizer

JSB_SPLITS = {"train": "train", "valid": "val", "test": "test"}  # JSON key → our split


def jsb_window(seq_len: int) -> int:
    """Tokens a JSB sample holds: the most whole time steps (4 tokens each) within seq_len + 1."""
    window = (seq_len + 1) // 4 * 4
    if window < 4:
        raise ValueError(f"--seq-len must be at least 3 for jsb (one 4-voice time step); got {seq_len}")
    return window


def load_jsb_json(path: Path) -> dict[str, Any]:
    """Read a JSB JSON and check its layout: an object with list-valued train (and usually valid, test)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the JSB JSON {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), list):
        raise ValueError(f"{path} is not a JSB chorale JSON: expected an object with a `train` list of pieces")
    for key in JSB_SPLITS:
        if not isinstance(data.get(key, []), list):
            raise ValueError(f"{path}: `{key}` must be a list of pieces")
    return data


def jsb_units(data: dict[str, Any], window: int) -> list[tuple[str, str, list, int]]:
    """(split, piece name, piece, window) for every piece, in JSON split order then piece order."""
    names = data.get("names") if isinstance(data.get("names"), dict) else {}
    units = []
    for key, split in JSB_SPLITS.items():
        pieces = data.get(key, [])
        labels = names.get(key) if len(names.get(key) or []) == len(pieces) else None
        for index, piece in enumerate(pieces):
            units.append((split, labels[index] if labels else f"{key}[{index}]", piece, window))
    return units


def jsb_unit(unit: tuple[str, str, list, int]) -> UnitResult:
    """Worker: one piece → its raster windows, or a skip with the reason."""
    split, name, piece, window = unit
    result = UnitResult(items=1)
    try:
        if not isinstance(piece, list) or not all(isinstance(step, list) for step in piece):
            raise ValueError("a piece must be a list of time steps, each a list of pitches")
        ids = worker_tokenizer().encode(piece)
    except (ValueError, TypeError) as err:
        result.skipped.append((name, str(err)))
        return result
    if not len(ids):
        result.skipped.append((name, "empty piece"))
        return result
    result.add(split, [ids[start:start + window] for start in range(0, len(ids), window)])
    result.count("pieces")
    result.count("time_steps", len(ids) // 4)
    return result


def prep_jsb(input: Path | None, out: Path, *, from_music21: bool, seq_len: int = 2048, options: PrepOptions,
             music21_limit: int | None = None) -> dict | None:
    """Prepare the JSB chorales from `input` (the JSON) or from music21's chorales; see the module docstring.

    `music21_limit` keeps the first N chorales of music21's corpus (tests). Returns the manifest, or None when
    `out` already holds this prep.
    """
    from data_prep import music21_chorales

    if from_music21 == (input is not None):
        raise ValueError("give exactly one of --input FILE.json and --from-music21")
    window = jsb_window(seq_len)
    if from_music21:
        args: dict[str, Any] = {"source": "music21", "music21": music21_chorales.music21_version(),
                                "music21_limit": music21_limit,
                                "music21_builder": music21_chorales.BUILDER_VERSION}
    else:
        input = Path(input)
        if not input.is_file():
            raise ValueError(f"JSB JSON {input} does not exist")
        args = {"input": file_stamp(input)}
    args.update(seq_len=seq_len, **options.shard_args())
    if already_done(out, "jsb", args, options.overwrite):
        return None
    extra: dict[str, Any] = {"window_tokens": window}
    if from_music21:
        input = music21_chorales.cache_path(out)
        built = music21_chorales.build_music21_json(input, workers=options.resolved_workers, limit=music21_limit,
                                                     progress=options.progress)
        extra["music21_dropped"] = built["dropped"]
    data = load_jsb_json(input)
    units = shard_slice(jsb_units(data, window), options.shard_index, options.num_shards)
    tokenizer = JSBTokenizer()
    with ShardWriter(out, corpus="jsb", args=args, tokenizer=tokenizer.info, seq_len=seq_len,
                     compression=options.compression) as writer:
        writer.inputs.append(input_record(input))
        stats = run_units(units, jsb_unit, writer, options, total=len(units), desc="jsb")
        return writer.publish(options.max_skip_fraction, extra={"stats": stats, **extra})
