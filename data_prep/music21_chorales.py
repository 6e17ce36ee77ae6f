"""The JSB chorale JSON built from the Bach chorales bundled with music21 (`pope prep jsb --from-music21`).

The output has the layout of czhuang/JSB-Chorales-dataset's Jsb16thSeparated.json, so the ordinary JSB prep reads
it: keys train/valid/test, a piece a list of 16th-note time steps, a step the sounding MIDI pitch of each of the
four parts in score order (soprano, alto, tenor, bass), −1 where a part rests. It adds `names` (split → the
music21 corpus names of its pieces, e.g. bach/bwv153.1, in the pieces' order), `dropped` (chorales left out and
why) and `source` (what it was built from: music21's version, the limit, the split seed, this builder's version).

- Chorales: music21.corpus.chorales.Iterator(returnType='filename'): 371 entries naming 350 distinct files (some
  chorales are listed twice; each is taken once). Those without exactly four parts (a few have instrumental parts)
  are dropped and listed.
- Quantisation: a note covers the steps from round(4·offset) to round(4·(offset + quarterLength)), offsets taken
  from the part's flattened stream; notes shorter than half a 16th after rounding (grace notes) vanish; a chord
  inside a part keeps its top note. Repeats are not expanded.
- Split: the kept chorales, sorted by name, are permuted with a fixed seed and cut like the original 229/76/77
  (train/valid/test); within a split the pieces are in name order.
- Parsing takes a fraction of a second a chorale, so it runs in a process pool; the result is cached as a JSON
  file (prep_jsb puts it next to the output folder, `<out>.music21.json`) and reused while `source` matches.
"""

from __future__ import annotations

import importlib.metadata
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

from data_prep.atomic import atomic_write

BUILDER_VERSION = 1
SPLIT_SEED = 1234
ORIGINAL_SPLIT = (229, 76, 77)  # train, valid, test sizes of the original JSB release
STEPS_PER_QUARTER = 4
PARTS = 4


def music21_version() -> str:
    """The installed music21's version, or a one-line ValueError telling how to install it."""
    try:
        return importlib.metadata.version("music21")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError("--from-music21 needs music21, an optional extra: pip install music21") from None


def cache_path(out: Path) -> Path:
    """Where prep_jsb keeps the JSON built for output folder `out`: next to it, outside the published folder so
    that --overwrite does not throw it away."""
    return Path(out).parent / f"{Path(out).name}.music21.json"


def chorale_names(limit: int | None = None) -> list[str]:
    """music21's chorale corpus names (bach/bwv269, ...) in its own order, each once; the first `limit` (tests)
    or all. The iterator follows Riemenschneider's numbering, which lists some chorales twice (371 entries, 350
    distinct files): a repeat would put the same piece in two splits."""
    music21_version()
    from music21 import corpus

    names = list(dict.fromkeys(str(name) for name in corpus.chorales.Iterator(returnType="filename")))
    return names if limit is None else names[:limit]


def quantise(parts: Sequence[Sequence[tuple[float, float, int]]]) -> list[list[int]]:
    """Parts as (offset, quarterLength, midi pitch) notes → 16th-note time steps of one pitch a part, −1 rest."""
    spans = [[(round(start * STEPS_PER_QUARTER), round((start + length) * STEPS_PER_QUARTER), pitch)
              for start, length, pitch in part] for part in parts]
    length = max((end for part in spans for _, end, _ in part), default=0)
    grid = np.full((length, len(parts)), -1, dtype=np.int64)
    for voice, part in enumerate(spans):
        for begin, end, pitch in part:
            grid[begin:end, voice] = pitch  # an empty range (a grace note) writes nothing
    return grid.tolist()


def parse_chorale(name: str) -> tuple[str, list[list[int]] | None, str]:
    """(name, time steps, "") for a four-part chorale, (name, None, why) for one that is left out."""
    from music21 import corpus

    try:
        score = corpus.parse(name)
    except Exception as err:  # noqa: BLE001 - a corpus file music21 cannot read is reported, not fatal
        return name, None, f"music21 cannot parse it: {err}"
    if len(score.parts) != PARTS:
        return name, None, f"{len(score.parts)} parts, not {PARTS}"
    parts = []
    for part in score.parts:
        notes = []
        for element in part.flatten().notes:  # notes and chords; rests are the steps nothing covers
            pitch = max(p.midi for p in element.pitches)
            notes.append((float(element.offset), float(element.quarterLength), pitch))
        parts.append(notes)
    steps = quantise(parts)
    if not steps:
        return name, None, "no notes"
    return name, steps, ""


def split_names(names: Sequence[str], seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Seeded train/valid/test split of chorale names in the original's proportions; each split sorted."""
    ordered = sorted(names)
    total = sum(ORIGINAL_SPLIT)
    n_valid = round(len(ordered) * ORIGINAL_SPLIT[1] / total)
    n_test = round(len(ordered) * ORIGINAL_SPLIT[2] / total)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    picked = {"valid": perm[:n_valid], "test": perm[n_valid:n_valid + n_test], "train": perm[n_valid + n_test:]}
    return {split: sorted(ordered[i] for i in picked[split]) for split in ("train", "valid", "test")}


def build_music21_json(path: Path, *, workers: int = 1, limit: int | None = None,
                       progress: bool = True) -> dict[str, Any]:
    """Build (or reuse, when its `source` matches) the chorale JSON at `path`; return its contents."""
    source = {"builder": BUILDER_VERSION, "music21": music21_version(), "limit": limit, "split_seed": SPLIT_SEED}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("source") == source:
                return cached
        except (OSError, json.JSONDecodeError):
            pass  # unreadable: build it again
    names = chorale_names(limit)
    bar = tqdm(total=len(names), desc="music21 chorales", unit="piece", disable=not progress, file=sys.stderr)
    if workers > 1:
        # fork: the workers inherit the imported music21 instead of importing it again each.
        with multiprocessing.get_context("fork").Pool(min(workers, len(names) or 1)) as pool:
            parsed = []
            for item in pool.imap(parse_chorale, names, chunksize=4):  # in order, like map
                parsed.append(item)
                bar.update(1)
    else:
        parsed = []
        for name in names:
            parsed.append(parse_chorale(name))
            bar.update(1)
    bar.close()
    steps = {name: piece for name, piece, _ in parsed if piece is not None}
    dropped = [{"name": name, "reason": why} for name, piece, why in parsed if piece is None]
    splits = split_names(list(steps))
    data: dict[str, Any] = {split: [steps[n] for n in members] for split, members in splits.items()}
    data.update(names=splits, dropped=dropped, source=source)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, separators=(",", ":")) + "\n")  # a concurrent part reads old or new
    return data
