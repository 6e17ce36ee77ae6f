"""Small real inputs for the music prep tests: a JSB chorale JSON and MIDI files written with symusic and mido."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TPQ = 480  # ticks per quarter of the files written here

# ------------------------------------------------------------------------------------------------------------ JSB

# Pitches as floats the way Jsb16thSeparated.json stores them; some steps lack a voice (fewer than four entries).
_SHORT = [[74.0, 70.0, 65.0, 58.0], [74.0, 70.0, 65.0], [75.0, 70.0, 67.0, 55.0], [-1, 70.0, 67.0, 55.0]]
_LONG = [[60.0 + step % 12, 55.0 + step % 5, -1 if step % 7 == 0 else 50.0, 40.0 + step % 3] for step in range(40)]
_BAD = [[74.0, 70.0, 65.0, 58.0], [110.0, 70.0, 65.0, 58.0]]  # 110 is above the piano's C8
JSB_DATA = {
    "train": [_SHORT, _LONG, _BAD, [[72, 67, 64, 48]] * 3],
    "valid": [[[71.0, 67.0, 62.0, 43.0]] * 5, [[69.0, 64.0], [69.0, 64.0, 61.0, 45.0]]],
    "test": [[[67.0, 62.0, 59.0, 55.0], [66.0, 62.0, 57.0, 50.0]] * 4],
}
JSB_BAD = ("train[2]", "outside 21..108")  # the piece skipped, and a fragment of its reason


def normalise(piece: list[list[float]]) -> list[list[int]]:
    """What a piece should decode to: four integer pitches a step, −1 for silence and for a missing voice."""
    return [[int(p) for p in step] + [-1] * (4 - len(step)) for step in piece]


def write_jsb(folder: Path) -> Path:
    path = folder / "Jsb16thSeparated.json"
    path.write_text(json.dumps(JSB_DATA))
    return path


# ----------------------------------------------------------------------------------------------------------- MIDI


def _melody(offset: int, count: int, step: int = 240, low: int = 60) -> list[tuple[int, int, int, int]]:
    """(time, duration, pitch, velocity) notes on an 8th-note grid, a different line for each offset."""
    return [(i * step, step, low + (i * (offset + 2)) % 13, 64 + (i * 5) % 40) for i in range(count)]


# name → tracks of notes; g reaches 107, so only the shifts -3..+1 keep it within 21..108.
MIDI_NOTES = {
    "a.mid": [_melody(1, 24)],
    "b.mid": [_melody(2, 20), _melody(3, 10, step=480, low=40)],  # two tracks: right and left hand
    "c.mid": [_melody(4, 18)],
    "d.mid": [_melody(5, 16, low=48)],
    "e.mid": [_melody(6, 22, low=55)],
    "g.mid": [_melody(7, 12, low=95)],
}
HIGH_FILE, HIGH_SHIFTS = "g.mid", (-3, -2, -1, 0, 1)


def write_symusic(path: Path, tracks: list[list[tuple[int, int, int, int]]], time_signature=(4, 4)) -> None:
    from symusic import Note, Score, Tempo, TimeSignature, Track

    score = Score(TPQ)
    score.time_signatures.append(TimeSignature(0, *time_signature))
    score.tempos.append(Tempo(0, 120.0))
    for index, notes in enumerate(tracks):
        track = Track(name=f"piano {index}", program=0)
        for time, duration, pitch, velocity in notes:
            track.notes.append(Note(time, duration, pitch, velocity))
        score.tracks.append(track)
    score.dump_midi(str(path))


def write_mido(path: Path) -> None:
    """A type-1 file written with mido: two tracks, a sustain pedal press, notes as note_on/note_off pairs."""
    import mido

    midi = mido.MidiFile(type=1, ticks_per_beat=TPQ)
    for track_index, low in enumerate((64, 45)):
        track = mido.MidiTrack()
        track.append(mido.MetaMessage("track_name", name=f"hand {track_index}", time=0))
        if track_index == 0:
            track.append(mido.Message("control_change", control=64, value=127, time=0))
        for i in range(12):
            pitch = low + (i * 3) % 10
            track.append(mido.Message("note_on", note=pitch, velocity=70, time=0))
            track.append(mido.Message("note_off", note=pitch, velocity=0, time=TPQ))
        if track_index == 0:
            track.append(mido.Message("control_change", control=64, value=0, time=0))
        midi.tracks.append(track)
    midi.save(str(path))


def write_midi_folder(folder: Path, *, csv_rows: dict[str, str] | None = None, corrupt: int = 1) -> Path:
    """The MIDI fixture: MIDI_NOTES (c.mid in 3/4), f.mid via mido, a byte-identical copy of a.mid under sub/,
    `corrupt` garbage files, and a MAESTRO-style CSV (midi_filename → split) when csv_rows is given."""
    folder.mkdir(parents=True)
    for name, tracks in MIDI_NOTES.items():
        write_symusic(folder / name, tracks, (3, 4) if name == "c.mid" else (4, 4))
    write_mido(folder / "f.MIDI")
    (folder / "sub").mkdir()
    shutil.copyfile(folder / "a.mid", folder / "sub" / "dup.mid")
    for index in range(corrupt):
        (folder / f"corrupt{index}.mid").write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x02\x01\xe0MTrk\xff\xff" +
                                                    bytes(range(index, 40)))
    (folder / "notes.txt").write_text("not a MIDI file")
    if csv_rows is not None:
        lines = ["canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration"]
        lines += [f"Bach,Piece {i},{split},2018,{name},{name}.wav,1.0"
                  for i, (name, split) in enumerate(csv_rows.items())]
        (folder / "maestro-v3.0.0.csv").write_text("\n".join(lines) + "\n")
    return folder
