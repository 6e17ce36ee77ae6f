"""Small real datasets for the tiny configs (configs/tiny/), built from generated inputs in the real formats.

    python tests/tiny_data.py [DATA_DIR]      # default data/tiny: text, genome, jsb, midi, indirect

Each corpus goes through its real `pope prep` path (jsonl → SentencePiece, FASTA.gz + BED → 6-mers, JSB JSON,
MIDI files written with symusic → REMI, the indirect indexing generator), at sizes that train in about a minute.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conftest import synthetic_documents  # noqa: E402
from data_prep.parallel import PrepOptions  # noqa: E402
from music_fixtures import MIDI_NOTES, write_symusic  # noqa: E402

OPTIONS = dict(workers=1, progress=False)
CORPORA = ("text", "genome", "jsb", "midi", "indirect")


def build_text(out: Path) -> Path:
    from data_prep.text import prep_text

    source = out.parent / f"{out.name}.jsonl"
    source.write_text("\n".join(json.dumps({"text": d}) for d in synthetic_documents(600, 1)))
    prep_text([source], out, vocab_size=320, val_fraction=0.1, seq_len=128, options=PrepOptions(**OPTIONS))
    return out


def build_genome(out: Path) -> Path:
    from data_prep.genome import prep_genome

    rng = np.random.default_rng(0)
    motifs = ["".join(rng.choice(list("ACGT"), 12)) for _ in range(20)]  # repeats a model can learn
    records = {f"chr{i}": "".join(rng.choice(motifs, 1500)) for i in (1, 2, 3)}
    fasta = out.parent / f"{out.name}.fa.gz"
    fasta.write_bytes(gzip.compress("".join(f">{k}\n{v}\n" for k, v in records.items()).encode()))
    bed = out.parent / f"{out.name}.bed"
    bed.write_text("chr1\t0\t18000\ttrain\nchr2\t0\t18000\ttrain\nchr3\t0\t9000\tvalid\nchr3\t9000\t18000\ttest\n")
    prep_genome(fasta, out, bed=bed, tokenizer="kmer6", val_chroms=[], test_chroms=[], seq_len=128,
                options=PrepOptions(**OPTIONS))
    return out


def build_jsb(out: Path) -> Path:
    from data_prep.jsb import prep_jsb

    rng = np.random.default_rng(0)

    def piece() -> list[list[int]]:
        root = int(rng.integers(55, 67))
        return [[root + 12 + s % 5, root + 7, root + 4 - s % 3, root - 12] for s in range(int(rng.integers(48, 96)))]

    data = {"train": [piece() for _ in range(40)], "valid": [piece() for _ in range(8)],
            "test": [piece() for _ in range(8)]}
    source = out.parent / f"{out.name}.json"
    source.write_text(json.dumps(data))
    prep_jsb(source, out, from_music21=False, seq_len=256, options=PrepOptions(**OPTIONS))
    return out


def build_midi(out: Path) -> Path:
    from data_prep.midi import prep_midi

    folder = out.parent / f"{out.name}-files"
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["canonical_composer,canonical_title,split,year,midi_filename,audio_filename,duration"]
    for copy, split in enumerate(("train", "train", "validation", "test")):
        for name, tracks in MIDI_NOTES.items():  # the fixture's pieces, shifted so each file is distinct
            shifted = [[(t + 120 * copy, d, p + copy, v) for t, d, p, v in track] for track in tracks]
            write_symusic(folder / f"{copy}-{name}", shifted)
            rows.append(f"Test,{copy}-{name},{split},2026,{copy}-{name},,1.0")
    (folder / "maestro-v3.0.0.csv").write_text("\n".join(rows) + "\n")
    prep_midi(folder, out, transpose=3, seed=0, seq_len=256, options=PrepOptions(**OPTIONS))
    return out


def build_indirect(out: Path) -> Path:
    from data_prep.indirect import prep_indirect

    prep_indirect(out, train=4000, val=256, test=256, seq_len=64, options=PrepOptions(**OPTIONS))
    return out


def build(corpus: str, root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    out = root / corpus
    if not (out / "DONE").exists():
        globals()[f"build_{corpus}"](out)
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "data/tiny")
    for name in CORPORA:
        print(f"{name}: {build(name, target)}")
