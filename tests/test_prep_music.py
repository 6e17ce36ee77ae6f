"""The music preps on real inputs: a JSB JSON, MIDI files parsed by symusic/miditok, music21's chorales."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep.contract import TOKENIZER_DIR, read_manifest
from data_prep.jsb import jsb_window, prep_jsb
from data_prep.mds import read_split
from data_prep.midi import prep_midi, seeded_split
from data_prep.parallel import PrepOptions
from data_prep.shards import merge_parts
from data_prep.tokenizers import load_tokenizer
from data_prep.tokenizers.music import JSB_VOCAB, JSBTokenizer, REMITokenizer
from launch.cli import main as pope_main
from music_fixtures import (HIGH_FILE, HIGH_SHIFTS, JSB_BAD, JSB_DATA, MIDI_NOTES, TPQ, normalise,
                                  write_jsb, write_midi_folder)

JSB_SEQ_LEN = 63  # windows of 64 tokens = 16 time steps: the 40-step piece needs three
MIDI_SEQ_LEN = 63


def options(workers: int = 1, **kwargs) -> PrepOptions:
    return PrepOptions(workers=workers, progress=False, max_skip_fraction=kwargs.pop("max_skip_fraction", 0.2),
                       **kwargs)


def samples(out: Path, split: str) -> list[np.ndarray]:
    return [np.asarray(s, dtype=np.int64) for s in read_split(out / split)] if (out / split).is_dir() else []


def all_samples(out: Path) -> dict[str, list[list[int]]]:
    return {split: [s.tolist() for s in samples(out, split)] for split in ("train", "val", "test")}


def check_counts(out: Path, manifest: dict) -> None:
    """The manifest's per-split counts are what the shards hold."""
    for split, counts in manifest["splits"].items():
        held = samples(out, split)
        assert counts == {"samples": len(held), "tokens": sum(len(s) for s in held)}


# ------------------------------------------------------------------------------------------------------------ JSB


def test_jsb_vocabulary_layout_and_round_trip():
    tokenizer = JSBTokenizer()
    assert tokenizer.info.vocab_size == len(JSB_VOCAB) == 90
    assert (tokenizer.info.pad, tokenizer.info.bos, tokenizer.info.eos) == (0, None, None)
    ids = tokenizer.encode([[21, 108.0], [60, -1, 59, 58]])
    assert ids.tolist() == [2, 89, 1, 1, 41, 1, 40, 39]  # pitch p → p − 19: contiguous, ascending
    assert [JSB_VOCAB[i] for i in ids[:2]] == ["Pitch_21", "Pitch_108"]
    assert tokenizer.decode(ids) == [[21, 108, -1, -1], [60, -1, 59, 58]]
    for bad, message in [([[20, 60]], "outside 21..108"), ([[60.5]], "whole number"), ([[1, 2, 3, 4, 5]], "voices")]:
        with pytest.raises(ValueError, match=message):
            tokenizer.encode(bad)
    with pytest.raises(ValueError, match="vocabulary differs"):
        JSBTokenizer.from_manifest({"kind": "jsb", "vocab": JSB_VOCAB[:-1]}, Path("."))
    # The training loader's augmentation: pitches move, PAD and SILENCE stay, None when a pitch leaves 21..108.
    assert tokenizer.transpose(ids, 1) is None and tokenizer.transpose(ids, -1) is None
    down = tokenizer.transpose(np.array([41, 1, 40, 2, 0, 0], dtype=np.uint16), 2)
    assert down.dtype == np.uint16 and down.tolist() == [43, 1, 42, 4, 0, 0]
    assert tokenizer.decode(down) == [[62, -1, 61, 23]]
    assert jsb_window(2048) == 2048 and jsb_window(63) == 64 and jsb_window(10) == 8


@pytest.fixture(scope="module")
def jsb(tmp_path_factory):
    """The JSB fixture prepared once with one worker: (json path, out, manifest)."""
    root = tmp_path_factory.mktemp("jsb")
    source = write_jsb(root)
    out = root / "out"
    manifest = prep_jsb(source, out, from_music21=False, seq_len=JSB_SEQ_LEN, options=options(1))
    return source, out, manifest


def test_jsb_shards_decode_to_the_source_steps(jsb):
    _, out, manifest = jsb
    tokenizer = load_tokenizer(out)
    window = jsb_window(JSB_SEQ_LEN)
    for key, split in (("train", "train"), ("valid", "val"), ("test", "test")):
        held = samples(out, split)
        assert all(len(s) % 4 == 0 and 4 <= len(s) <= JSB_SEQ_LEN + 1 for s in held)
        pieces = [p for i, p in enumerate(JSB_DATA[key]) if (key, i) != ("train", 2)]
        cursor = 0
        for piece in pieces:  # each piece starts a new window: its windows are the next ceil(4·steps/64)
            count = -(-4 * len(piece) // window)
            steps = [step for s in held[cursor:cursor + count] for step in tokenizer.decode(s)]
            assert steps == normalise(piece)
            cursor += count
        assert cursor == len(held)
    assert len(samples(out, "train")) == 1 + 3 + 1  # the 40-step piece needs three windows
    assert [(s["file"], JSB_BAD[1] in s["reason"]) for s in manifest["skipped"]] == [(JSB_BAD[0], True)]
    assert manifest["items"] == 7 and manifest["stats"]["pieces"] == 6
    assert manifest["tokenizer"] == {"kind": "jsb", "vocab": JSB_VOCAB} and manifest["vocab_size"] == 90
    assert manifest["dtype"] == "uint16"
    check_counts(out, manifest)


def test_jsb_rerun_workers_and_shards_agree(jsb, tmp_path):
    source, out, _ = jsb
    assert prep_jsb(source, out, from_music21=False, seq_len=JSB_SEQ_LEN, options=options(1)) is None
    with pytest.raises(ValueError, match="different seq_len"):
        prep_jsb(source, out, from_music21=False, seq_len=127, options=options(1))
    prep_jsb(source, tmp_path / "two", from_music21=False, seq_len=JSB_SEQ_LEN, options=options(2))
    assert all_samples(tmp_path / "two") == all_samples(out)
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for index, part in enumerate(parts):
        prep_jsb(source, part, from_music21=False, seq_len=JSB_SEQ_LEN,
                 options=options(2, shard_index=index, num_shards=2, max_skip_fraction=0.5))
    merged = merge_parts(tmp_path / "merged", parts)
    assert all_samples(tmp_path / "merged") == all_samples(out)
    assert merged["splits"] == read_manifest(out)["splits"] and len(merged["inputs"]) == 1


def test_jsb_cli(jsb, tmp_path, capsys):
    source, _, _ = jsb
    argv = ["prep", "jsb", "--input", str(source), "--out", str(tmp_path / "cli"), "--seq-len", str(JSB_SEQ_LEN),
            "--workers", "1", "--no-progress"]
    assert pope_main(argv) == 2  # one bad piece in seven is more than the default 1%
    assert "--max-skip-fraction" in capsys.readouterr().err
    assert pope_main(argv + ["--max-skip-fraction", "0.2"]) == 0
    assert pope_main(argv + ["--max-skip-fraction", "0.2"]) == 0  # a no-op
    assert "nothing to do" in capsys.readouterr().out
    assert pope_main(["prep", "jsb", "--input", str(source), "--from-music21", "--out", str(tmp_path / "x")]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"valid": []}))
    assert pope_main(["prep", "jsb", "--input", str(bad), "--out", str(tmp_path / "y"), "--no-progress"]) == 2


def test_music21_quantise_rules():
    from data_prep.music21_chorales import quantise, split_names

    steps = quantise([[(0.0, 1.0, 60), (1.0, 0.5, 62), (1.5, 0.0, 90), (2.0, 1 / 3, 64)], [(0.5, 2.5, 48)]])
    assert steps == [[60, -1], [60, -1], [60, 48], [60, 48], [62, 48], [62, 48], [-1, 48], [-1, 48],
                     [64, 48], [-1, 48], [-1, 48], [-1, 48]]  # grace note gone, a triplet 8th rounds to 1 step
    names = [f"bach/bwv{i}" for i in range(382)]
    splits = split_names(names)
    assert [len(splits[k]) for k in ("train", "valid", "test")] == [229, 76, 77]
    assert sorted(sum(splits.values(), [])) == sorted(names) and split_names(names[::-1]) == splits


def test_jsb_from_music21_subset(tmp_path):
    pytest.importorskip("music21")
    from data_prep import music21_chorales

    out = tmp_path / "m21"
    manifest = prep_jsb(None, out, from_music21=True, seq_len=255, options=options(2), music21_limit=6)
    cache = music21_chorales.cache_path(out)
    data = json.loads(cache.read_text())
    names = [n for split in ("train", "valid", "test") for n in data["names"][split]]
    assert len(names) + len(data["dropped"]) == 6 and len(names) >= 5
    assert [len(data["names"][k]) for k in ("valid", "test")] == [1, 1]
    assert all(len(step) == 4 for split in ("train", "valid", "test") for piece in data[split] for step in piece)
    # bwv269 (music21's first chorale) opens G4 crotchet, G4 minim, D5 crotchet, B4 dotted crotchet, A4 quaver:
    # on the 16th grid 4 + 8 + 4 + 6 + 2 steps.
    split = next(k for k in ("train", "valid", "test") if "bach/bwv269" in data["names"][k])
    piece = data[split][data["names"][split].index("bach/bwv269")]
    assert [step[0] for step in piece[:24]] == [67] * 12 + [74] * 4 + [71] * 6 + [69] * 2
    assert all(-1 <= p <= 127 for step in piece for p in step) and piece[0][3] != -1
    assert manifest["inputs"][0]["path"] == str(cache) and manifest["args"]["music21_limit"] == 6
    assert sum(c["samples"] for c in manifest["splits"].values()) >= len(names) and not manifest["skipped"]
    check_counts(out, manifest)
    assert prep_jsb(None, out, from_music21=True, seq_len=255, options=options(2), music21_limit=6) is None
    stamp, before = cache.stat().st_mtime_ns, all_samples(out)
    shutil.rmtree(out)
    again = prep_jsb(None, out, from_music21=True, seq_len=255, options=options(1), music21_limit=6)
    assert cache.stat().st_mtime_ns == stamp  # the cache was reused, nothing parsed again
    assert all_samples(out) == before and again["splits"] == manifest["splits"]


def test_music21_missing_is_one_line(monkeypatch, tmp_path, capsys):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert pope_main(["prep", "jsb", "--from-music21", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == (
        "pope: error: --from-music21 needs music21, an optional extra: pip install music21")


# ----------------------------------------------------------------------------------------------------------- MIDI

CSV_SPLITS = {"a.mid": "train", "b.mid": "validation", "c.mid": "test", "corrupt0.mid": "train",
              "d.mid": "train", "e.mid": "train", "f.MIDI": "train", "g.mid": "train", "sub/dup.mid": "train"}
TRAIN_FILES = ["a.mid", "d.mid", "e.mid", "f.MIDI", "g.mid"]  # sorted; dup is a.mid's copy, corrupt0 is skipped


def versions(held: list[np.ndarray], bos: int, eos: int) -> list[list[int]]:
    """The split's samples joined and cut back into BOS..EOS streams, one per file version."""
    stream = np.concatenate(held).tolist()
    starts = [i for i, t in enumerate(stream) if t == bos]
    assert starts and starts[0] == 0
    pieces = [stream[s:e] for s, e in zip(starts, starts[1:] + [len(stream)])]
    assert all(p[-1] == eos and eos not in p[:-1] for p in pieces)
    return [p[1:-1] for p in pieces]


def notes_of(score) -> list[tuple[float, float, int]]:
    """(onset, duration) in quarters and pitch of every note, sorted."""
    tpq = score.ticks_per_quarter
    return sorted((n.time / tpq, n.duration / tpq, n.pitch) for t in score.tracks for n in t.notes)


def direct_remi(tokenizer_file: Path, midi: Path) -> list[int]:
    """miditok on its own: merge the tracks, encode."""
    import miditok
    from miditok.utils import merge_tracks
    from symusic import Score

    remi = miditok.REMI(params=tokenizer_file)
    score = Score(str(midi))
    merge_tracks(score)
    return list(remi.encode(score)[0].ids)


def test_remi_vocabulary():
    tokenizer = REMITokenizer()
    assert tokenizer.info.vocab_size == 328
    assert (tokenizer.info.pad, tokenizer.info.bos, tokenizer.info.eos, tokenizer.remi["MASK_None"]) == (0, 1, 2, 3)
    kinds = {}
    for token in tokenizer.remi.vocab:
        kinds[token.split("_")[0]] = kinds.get(token.split("_")[0], 0) + 1
    assert kinds["Pitch"] == 88 and kinds["Velocity"] == 32 and "Chord" not in kinds and "Tempo" not in kinds


@pytest.fixture(scope="module")
def midi_csv(tmp_path_factory):
    """The MIDI fixture with a MAESTRO CSV, prepared once with two workers: (folder, out, manifest)."""
    root = tmp_path_factory.mktemp("midi_csv")
    folder = write_midi_folder(root / "maestro", csv_rows=CSV_SPLITS)
    out = root / "out"
    manifest = prep_midi(folder, out, transpose=3, seq_len=MIDI_SEQ_LEN, options=options(2))
    return folder, out, manifest


def test_midi_val_test_match_the_source_files(midi_csv):
    folder, out, manifest = midi_csv
    tokenizer = load_tokenizer(out)
    assert isinstance(tokenizer, REMITokenizer) and tokenizer.info.vocab_size == manifest["vocab_size"] == 328
    bos, eos = manifest["special_ids"]["bos"], manifest["special_ids"]["eos"]
    saved = out / TOKENIZER_DIR / manifest["tokenizer"]["file"]
    for split, name in (("val", "b.mid"), ("test", "c.mid")):
        held = samples(out, split)
        assert all(2 <= len(s) <= MIDI_SEQ_LEN + 1 for s in held) and len(held) > 1
        (ids,) = versions(held, bos, eos)  # one file, untransposed
        assert ids == direct_remi(saved, folder / name)
        source = sorted((t / TPQ, d / TPQ, p) for track in MIDI_NOTES[name] for t, d, p, _ in track)
        assert notes_of(tokenizer.decode(ids)) == source


def test_midi_train_holds_the_transposed_versions(midi_csv):
    folder, out, manifest = midi_csv
    tokenizer = load_tokenizer(out)
    streams = versions(samples(out, "train"), manifest["special_ids"]["bos"], manifest["special_ids"]["eos"])
    expected = [(name, shift) for name in TRAIN_FILES
                for shift in (HIGH_SHIFTS if name == HIGH_FILE else range(-3, 4))]
    assert len(streams) == len(expected) == 7 * 4 + 5
    original = {name: notes_of(tokenizer.prepare(folder / name)) for name in TRAIN_FILES}
    for (name, shift), ids in zip(expected, streams):
        assert notes_of(tokenizer.decode(ids)) == [(t, d, p + shift) for t, d, p in original[name]], (name, shift)
    pedalled = streams[expected.index(("f.MIDI", 0))]  # mido wrote a sustain pedal press into f.MIDI
    assert [tokenizer.remi[i] for i in pedalled].count("Pedal_0") == 1
    stats = manifest["stats"]
    assert stats["versions"] == len(expected) + 2 and stats["transpositions_skipped"] == 2
    assert stats["duplicates"] == 1 and stats["files"] == 7 and manifest["items"] == 8


def test_midi_manifest_duplicates_and_corrupt(midi_csv):
    folder, out, manifest = midi_csv
    assert [s["file"] for s in manifest["skipped"]] == ["corrupt0.mid"]
    assert "unreadable MIDI" in manifest["skipped"][0]["reason"]
    names = [Path(i["path"]).name for i in manifest["inputs"]]
    assert names[0] == "maestro-v3.0.0.csv" and "dup.mid" in names and "notes.txt" not in names
    assert manifest["split_source"] == "csv:maestro-v3.0.0.csv" and set(manifest["splits"]) == {"train", "val", "test"}
    check_counts(out, manifest)
    assert prep_midi(folder, out, transpose=3, seq_len=MIDI_SEQ_LEN, options=options(1)) is None


def test_midi_seeded_split_workers_and_shards(tmp_path):
    folder = write_midi_folder(tmp_path / "midi")
    single = prep_midi(folder, tmp_path / "w1", transpose=1, seq_len=MIDI_SEQ_LEN, options=options(1))
    prep_midi(folder, tmp_path / "w2", transpose=1, seq_len=MIDI_SEQ_LEN, options=options(2))
    assert all_samples(tmp_path / "w2") == all_samples(tmp_path / "w1")
    assert single["split_source"].startswith("seeded") and single["stats"]["duplicates"] == 1
    # 8 distinct files (corrupt0 included, dup.mid is a.mid): one val, one test, the rest train, disjoint.
    expected = seeded_split(["a.mid", "b.mid", "c.mid", "corrupt0.mid", "d.mid", "e.mid", "f.MIDI", "g.mid"], 1234)
    assert sorted(expected.values()) == ["test"] + ["train"] * 6 + ["val"]
    bos, eos = single["special_ids"]["bos"], single["special_ids"]["eos"]
    per_split = {split: versions(samples(tmp_path / "w1", split), bos, eos) for split in single["splits"]}
    good = {n: s for n, s in expected.items() if n != "corrupt0.mid"}
    for split in ("val", "test"):
        assert len(per_split.get(split, [])) == sum(s == split for s in good.values())
    train_files = [n for n, s in good.items() if s == "train"]
    assert len(per_split["train"]) == 3 * len(train_files)  # transpose 1: three versions, none out of range
    parts = [tmp_path / f"part{i}" for i in range(2)]
    for index, part in enumerate(parts):
        prep_midi(folder, part, transpose=1, seq_len=MIDI_SEQ_LEN,
                  options=options(2, shard_index=index, num_shards=2, max_skip_fraction=0.5))
    merged = merge_parts(tmp_path / "merged", parts)
    assert all_samples(tmp_path / "merged") == all_samples(tmp_path / "w1")
    assert merged["stats"] == single["stats"] and merged["splits"] == single["splits"]
    assert merged["skipped"] == single["skipped"] and merged["items"] == single["items"]
    assert merged["inputs"] == single["inputs"] and len(single["inputs"]) == 9


def test_seeded_split_depends_on_the_file_set_only():
    names = [f"{i:03d}.mid" for i in range(100)]
    split = seeded_split(names, 7)
    assert split == seeded_split(names[::-1], 7) and split != seeded_split(names, 8)
    assert [list(split.values()).count(s) for s in ("train", "val", "test")] == [90, 5, 5]


def test_midi_too_many_corrupt_files(tmp_path):
    folder = write_midi_folder(tmp_path / "midi", corrupt=3)
    with pytest.raises(ValueError, match="--max-skip-fraction"):
        prep_midi(folder, tmp_path / "out", seq_len=MIDI_SEQ_LEN, options=options(2))
    assert not (tmp_path / "out").exists()


def test_midi_cli(tmp_path, capsys):
    folder = write_midi_folder(tmp_path / "midi", corrupt=0)
    argv = ["prep", "midi", "--input", str(folder), "--out", str(tmp_path / "out"), "--seq-len", "127",
            "--transpose", "0", "--workers", "2", "--no-progress"]
    assert pope_main(argv) == 0
    assert "vocab 328" in capsys.readouterr().out
    manifest = read_manifest(tmp_path / "out")
    assert manifest["stats"]["versions"] == manifest["stats"]["files"] == 7 and not manifest["skipped"]
    assert pope_main(["prep", "midi", "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
