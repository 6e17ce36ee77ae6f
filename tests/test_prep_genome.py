"""`pope prep genome`: the DNA tokenizers, BED and window modes, bad inputs, sharding, workers, the CLI.

The fixtures are synthetic but have what real assemblies have: gzip, several records, uneven line widths, CRLF,
soft-masked lower case, runs of N (one long enough to fill whole samples), stray IUPAC codes. Expected samples come
from `reference_kmer6` below, a plain per-character transcription of the Nucleotide Transformer's rule written
independently of the vectorised tokenizer.
"""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from data_prep.genome import fasta_names, prep_genome, read_bed, read_fasta
from data_prep.mds import read_split
from data_prep.parallel import PrepOptions
from data_prep.shards import merge_parts
from data_prep.tokenizers.base import load_tokenizer
from data_prep.tokenizers.dna import CharTokenizer, Kmer6Tokenizer, count_non_acgtn, normalize

SEQ_LEN = 16  # samples of 17 tokens: many samples from a few kbp
KMERS = ["".join(p) for p in itertools.product("ATCG", repeat=6)]
SINGLE = {b: 4102 + i for i, b in enumerate("ATCGN")}


def reference_kmer6(seq: str) -> list[int]:
    """NT's rule, one character at a time: split at N, 6-mers from the left of each piece, the rest one by one."""
    ids: list[int] = []
    for i, piece in enumerate(normalize(seq).split("N")):
        if i:
            ids.append(SINGLE["N"])
        full = len(piece) // 6 * 6
        ids += [6 + KMERS.index(piece[j:j + 6]) for j in range(0, full, 6)]
        ids += [SINGLE[b] for b in piece[full:]]
    return ids


def reference_char(seq: str) -> list[int]:
    return [6 + "ACGTN".index(b) for b in normalize(seq)]


def expected_samples(bases: str, kind: str, seq_len: int = SEQ_LEN) -> tuple[list[list[int]], int]:
    """Samples of one interval (cut into seq_len+1 tokens, a lone last token dropped, all-N dropped), # dropped."""
    ids = reference_kmer6(bases) if kind == "kmer6" else reference_char(bases)
    n_id = 4106 if kind == "kmer6" else 10
    cut = [ids[i:i + seq_len + 1] for i in range(0, len(ids), seq_len + 1)]
    cut = [s for s in cut if len(s) >= 2]
    kept = [s for s in cut if any(t != n_id for t in s)]
    return kept, len(cut) - len(kept)


# ------------------------------------------------------------------------------------------------------ fixtures


def random_bases(rng: np.random.Generator, n: int) -> str:
    return "".join(rng.choice(list("ACGT"), n))


def genome_records(seed: int = 0) -> dict[str, str]:
    """Three records with soft-masking, N runs (one of 300 Ns: whole all-N samples) and IUPAC codes R and Y."""
    rng = np.random.default_rng(seed)
    chr1 = random_bases(rng, 5000)
    chr1 = chr1[:700] + chr1[700:1500].lower() + chr1[1500:2100] + "N" * 25 + chr1[2125:2500] + "R" + chr1[2501:]
    chr2 = random_bases(rng, 3000)
    chr2 = "NNNNNNNNNN" + chr2[10:1200] + "Y" + chr2[1201:2000] + "n" * 7 + chr2[2007:]
    chr3 = random_bases(rng, 2600)
    chr3 = chr3[:900] + "N" * 300 + chr3[1200:1900].lower() + chr3[1900:]
    return {"chr1": chr1, "chr2": chr2, "chr3": chr3}


def write_fasta(path: Path, records: dict[str, str]) -> Path:
    """gzip FASTA with CRLF endings and a different line width per record (and an uneven one inside chr2)."""
    text = []
    for (name, seq), width in zip(records.items(), (60, 80, 50, 70)):
        text.append(f">{name} synthetic test record")
        if name == "chr2":  # uneven lines inside a record
            cuts = [0, 13, 90, 91, 200] + list(range(260, len(seq), 77)) + [len(seq)]
            text += [seq[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]
        else:
            text += [seq[i:i + width] for i in range(0, len(seq), width)]
    path.write_bytes(gzip.compress(("\r\n".join(text) + "\r\n").encode()))
    return path


BED_ROWS = [  # (chrom, start, end, split) kept in file order; the last two are bad
    ("chr1", 0, 2000, "train"),
    ("chr1", 2000, 3000, "valid"),
    ("chr2", 100, 1500, "test"),
    ("chr3", 0, 2600, "train"),
    ("chr1", 3000, 4990, "train"),
    ("chr2", 1500, 2950, "train"),
    ("chr2", 2950, 3000, "valid"),
    ("chr1", 4000, 6000, "train"),  # beyond chr1's end (5000)
    ("chrUn_x", 0, 100, "train"),  # no such record
]


def write_bed(path: Path, rows=BED_ROWS) -> Path:
    lines = ["chrom\tstart\tend\tsplit", "# HyenaDNA layout, with a header and a comment"]
    lines += [f"{c}\t{s}\t{e}\t{sp}" if i % 2 else f"{c}  {s} {e}   {sp}" for i, (c, s, e, sp) in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def genome(tmp_path: Path) -> dict:
    records = genome_records()
    return {"records": records, "fasta": write_fasta(tmp_path / "genome.fa.gz", records),
            "bed": write_bed(tmp_path / "sequences.bed")}


def options(**kw) -> PrepOptions:
    return PrepOptions(**{"workers": 1, "progress": False, "max_skip_fraction": 0.25, **kw})


def prep_bed(genome: dict, out: Path, kind: str = "kmer6", **kw) -> dict | None:
    return prep_genome(genome["fasta"], out, bed=genome["bed"], tokenizer=kind, val_chroms=[], test_chroms=[],
                       seq_len=SEQ_LEN, options=options(**kw))


def shard_samples(out: Path) -> dict[str, list[list[int]]]:
    return {split: [s.tolist() for s in read_split(out / split)]
            for split in ("train", "val", "test") if (out / split / "index.json").is_file()}


# ---------------------------------------------------------------------------------------------------- tokenizers


def test_kmer6_vocabulary_is_nucleotide_transformers():
    tok = Kmer6Tokenizer()
    vocab = tok.info.vocab
    assert tok.info.vocab_size == len(vocab) == 4107
    assert vocab[:6] == ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>"]
    assert vocab[6:11] == ["AAAAAA", "AAAAAT", "AAAAAC", "AAAAAG", "AAAATA"]
    assert vocab[4101] == "GGGGGG" and vocab[4102:] == ["A", "T", "C", "G", "N"]
    assert (tok.info.pad, tok.info.bos, tok.info.eos, tok.info.kind) == (1, None, None, "kmer6")


@pytest.mark.parametrize("seq, ids", [
    # worked by hand: ATCGAA = 0·4⁵+1·4⁴+2·4³+3·4²+0+0 = 432 → 438; TGGCGA = 2028 → 2034; tail TGCAC one by one
    ("ATCGAATGGCGATGCAC", [438, 2034, 4103, 4105, 4104, 4102, 4104]),
    # N in the middle restarts the 6-mers; GGCGAT = 4017 → 4023; lower case and R (read as N) at the end
    ("ATCGAATNGGCGATGCACNNaaaaaatR", [438, 4103, 4106, 4023, 4105, 4104, 4102, 4104, 4106, 4106, 6, 4103, 4106]),
    ("GGGGGG", [4101]),
    ("ACG", [4102, 4104, 4105]),
    ("NNN", [4106, 4106, 4106]),
    ("", []),
])
def test_kmer6_hand_worked_ids(seq, ids):
    tok = Kmer6Tokenizer()
    assert tok.encode(seq).tolist() == ids == reference_kmer6(seq)
    assert tok.encode(seq.encode()).tolist() == ids  # bytes as well as str
    assert tok.decode(ids) == normalize(seq)


def test_kmer6_matches_reference_and_round_trips_on_random_sequences():
    rng = np.random.default_rng(1)
    tok, char = Kmer6Tokenizer(), CharTokenizer()
    for _ in range(300):
        seq = "".join(rng.choice(list("ACGTACGTACGTNNacgtnRYK"), rng.integers(0, 60)))
        assert tok.encode(seq).tolist() == reference_kmer6(seq), seq
        assert char.encode(seq).tolist() == reference_char(seq), seq
        assert tok.decode(tok.encode(seq)) == char.decode(char.encode(seq)) == normalize(seq)


def test_reverse_complement():
    tok, char = Kmer6Tokenizer(), CharTokenizer()
    assert char.decode(char.reverse_complement(char.encode("AACGTnr"))) == "NNACGTT"
    ids = tok.encode("ATCGAATGGCGATGCAC")
    assert tok.decode(tok.reverse_complement(ids)) == "GTGCATCGCCATTCGAT"
    assert tok.reverse_complement(ids).tolist() == reference_kmer6("GTGCATCGCCATTCGAT")
    assert tok.reverse_complement(tok.reverse_complement(ids)).tolist() == ids.tolist()


def test_char_tokenizer_and_helpers():
    char = CharTokenizer()
    assert char.info.vocab == ["<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>", "A", "C", "G", "T", "N"]
    assert char.encode("acgtNRy").tolist() == [6, 7, 8, 9, 10, 10, 10]
    assert char.decode([1, 6, 7, 1]) == "AC"  # padding spells nothing
    assert normalize("acGTnRY-") == "ACGTNNNN" and count_non_acgtn("acGTnRY-") == 3
    with pytest.raises(ValueError, match="token ids"):
        char.decode([11])
    assert Kmer6Tokenizer.from_manifest({"kind": "kmer6", "vocab": Kmer6Tokenizer().info.vocab}, Path(".")).k == 6
    with pytest.raises(ValueError, match="not this kmer6"):
        Kmer6Tokenizer.from_manifest({"kind": "kmer6", "vocab": ["A"]}, Path("."))


def test_read_bed_tolerates_headers_and_lists_malformed_rows(tmp_path):
    path = tmp_path / "x.bed"
    path.write_text("track name=x\n\nchr_name start end split\nchr1 0 10 train\nchr1\t5\t3\ttest\nchr1 a 4 train\n"
                    "chr1 0 5\nchr1 0 5 dev\nchr2 7 9 VALID extra\n")
    rows = read_bed(path)
    assert [(r.chrom, r.start, r.end, r.split) for r in rows if not r.error] == [("chr1", 0, 10, "train"),
                                                                                ("chr2", 7, 9, "val")]
    errors = [(r.where.rsplit(":", 1)[1], r.error) for r in rows if r.error]
    assert [e[0] for e in errors] == ["5", "6", "7", "8"]
    assert "empty interval" in errors[0][1] and "whole numbers" in errors[1][1]
    assert "3 fields" in errors[2][1] and "unknown split 'dev'" in errors[3][1]


def test_read_fasta_at_every_block_boundary(tmp_path):
    text = b">a desc > with gt\nAC\r\nG T\n>b\n\n>c x\nTTT>x\nGG\n>d"  # '>' inside lines is not a header
    want = [("a", b"ACGT"), ("b", b""), ("c", b"TTT>xGG"), ("d", b"")]
    (tmp_path / "x.fa").write_bytes(text)
    (tmp_path / "x.fa.gz").write_bytes(gzip.compress(text))
    for block in [*range(1, len(text) + 2), 1 << 24]:
        assert list(read_fasta(tmp_path / "x.fa", block)) == want, block
    assert list(read_fasta(tmp_path / "x.fa.gz")) == want
    assert fasta_names(tmp_path / "x.fa.gz") == (["a", "b", "c", "d"], None)


# ------------------------------------------------------------------------------------------------------ BED mode


def bed_expectations(records: dict[str, str], kind: str) -> tuple[dict[str, list[tuple[str, str]]], int]:
    """Per split, the (interval, bases) in output order (FASTA order, then BED order); total all-N samples."""
    by_split: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    dropped = 0
    for chrom in records:
        for c, start, end, split in BED_ROWS:
            if c == chrom and end <= len(records[chrom]):
                by_split["val" if split == "valid" else split].append((f"{c}:{start}-{end}", records[c][start:end]))
                dropped += expected_samples(records[c][start:end], kind)[1]
    return by_split, dropped


@pytest.mark.parametrize("kind", ["kmer6", "char"])
def test_bed_prep_gives_back_every_interval(genome, tmp_path, kind):
    out = tmp_path / "out"
    manifest = prep_bed(genome, out, kind)
    got = shard_samples(out)
    by_split, dropped = bed_expectations(genome["records"], kind)
    tok = load_tokenizer(out)
    for split, intervals in by_split.items():
        want, position = [], 0
        for label, bases in intervals:
            samples, n_dropped = expected_samples(bases, kind)
            mine = got[split][position:position + len(samples)]
            assert mine == samples, f"{split} {label}"
            decoded = "".join(tok.decode(s) for s in mine)
            ids = reference_kmer6(bases) if kind == "kmer6" else reference_char(bases)
            source = normalize(bases)
            if len(ids) % (SEQ_LEN + 1) == 1:  # a lone last token has no target: pack drops it
                source = source[:len(source) - len(tok.decode(ids[-1:]))]
            if n_dropped:  # the N-only samples are gone, nothing else
                assert decoded.replace("N", "") == source.replace("N", "")
                assert len(source) - len(decoded) == n_dropped * (SEQ_LEN + 1)
            else:
                assert decoded == source, f"{split} {label}"
            want += samples
            position += len(samples)
        assert got[split] == want
        assert manifest["splits"][split] == {"samples": len(want), "tokens": sum(map(len, want))}
    assert dropped >= 5 and manifest["stats"]["all_n_samples_dropped"] == dropped  # the 300-N run
    # the IUPAC codes inside intervals (R in chr1, Y in chr2) were counted and read as N
    assert manifest["stats"]["non_acgtn_bases"] == 2
    # splits are disjoint: no val/test sample shows up in train
    train = {tuple(s) for s in got["train"]}
    assert not train & {tuple(s) for s in got["val"] + got["test"]}
    assert manifest["items"] == len(BED_ROWS)
    skipped = {s["file"].rsplit(":", 1)[1]: s["reason"] for s in manifest["skipped"]}
    assert len(skipped) == 2
    assert "ends beyond chr1 (length 5,000)" in skipped[str(len(BED_ROWS) + 1)]  # rows start on line 3
    assert "'chrUn_x' is not in genome.fa.gz" in skipped[str(len(BED_ROWS) + 2)]
    assert manifest["vocab_size"] == (4107 if kind == "kmer6" else 11) and manifest["special_ids"]["pad"] == 1
    assert manifest["mode"] == "bed" and {i["path"] for i in manifest["inputs"]} == {str(genome["fasta"]),
                                                                                     str(genome["bed"])}
    assert json.loads((out / "manifest.json").read_text())["splits"] == manifest["splits"]


def test_rerun_is_a_no_op_and_other_arguments_refuse(genome, tmp_path):
    out = tmp_path / "out"
    assert prep_bed(genome, out) is not None
    assert prep_bed(genome, out) is None
    with pytest.raises(ValueError, match="different tokenizer"):
        prep_bed(genome, out, "char")


def test_too_many_bad_bed_rows_fail_with_one_line(genome, tmp_path):
    with pytest.raises(ValueError, match="--max-skip-fraction=0.1.*ends beyond"):
        prep_bed(genome, tmp_path / "out", max_skip_fraction=0.1)
    assert not (tmp_path / "out").exists()


def test_workers_do_not_change_the_output(genome, tmp_path, monkeypatch):
    monkeypatch.setattr("data_prep.genome.UNIT_BASES", 1000)  # many small units, so the pool reorders work
    one, two = tmp_path / "one", tmp_path / "two"
    prep_bed(genome, one, workers=1)
    prep_bed(genome, two, workers=2)
    assert shard_samples(one) == shard_samples(two)
    assert json.loads((one / "manifest.json").read_text())["stats"] == \
        json.loads((two / "manifest.json").read_text())["stats"]


# -------------------------------------------------------------------------------------------------- window mode


@pytest.mark.parametrize("kind", ["kmer6", "char"])
def test_window_mode_holds_out_records(genome, tmp_path, kind):
    out = tmp_path / "out"
    manifest = prep_genome(genome["fasta"], out, bed=None, tokenizer=kind, val_chroms=["chr2"],
                           test_chroms=["chr3"], seq_len=SEQ_LEN, options=options(workers=2))
    window = (6 if kind == "kmer6" else 1) * (SEQ_LEN + 1)
    assert manifest["mode"] == "windows" and manifest["window_bases"] == window
    got = shard_samples(out)
    for split, chrom in (("train", "chr1"), ("val", "chr2"), ("test", "chr3")):
        seq = genome["records"][chrom]
        want = [s for i in range(0, len(seq), window) for s in expected_samples(seq[i:i + window], kind)[0]]
        assert got[split] == want
        assert manifest["splits"][split]["samples"] == len(want)
    assert manifest["items"] == 3 and manifest["stats"]["non_acgtn_bases"] == 2
    assert manifest["stats"]["all_n_samples_dropped"] >= 1 and manifest["skipped"] == []


def test_window_mode_needs_a_validation_record(genome, tmp_path):
    with pytest.raises(ValueError, match="--val-chroms"):
        prep_genome(genome["fasta"], tmp_path / "out", bed=None, tokenizer="kmer6", val_chroms=[], test_chroms=[],
                    options=options())
    with pytest.raises(ValueError, match="not in genome.fa.gz: chr9"):
        prep_genome(genome["fasta"], tmp_path / "out", bed=None, tokenizer="kmer6", val_chroms=["chr9"],
                    test_chroms=[], options=options())
    with pytest.raises(ValueError, match="only without --bed"):
        prep_genome(genome["fasta"], tmp_path / "out", bed=genome["bed"], tokenizer="kmer6", val_chroms=["chr2"],
                    test_chroms=[], options=options())


# --------------------------------------------------------------------------------------------------- bad inputs


def truncated_fasta(tmp_path: Path) -> Path:
    """chr1..chr3 complete, then a long chr4 whose gzip stream is cut off."""
    records = {**genome_records(), "chr4": random_bases(np.random.default_rng(2), 200_000)}
    full = write_fasta(tmp_path / "full.fa.gz", records).read_bytes()
    path = tmp_path / "truncated.fa.gz"
    path.write_bytes(full[:len(full) * 3 // 4])
    return path


def test_truncated_fasta_is_listed_and_the_complete_records_are_used(tmp_path):
    fasta = truncated_fasta(tmp_path)
    manifest = prep_genome(fasta, tmp_path / "out", bed=None, tokenizer="kmer6", val_chroms=["chr2"],
                           test_chroms=[], seq_len=SEQ_LEN, options=options(max_skip_fraction=0.5))
    assert manifest["items"] == 4 and len(manifest["skipped"]) == 1
    assert manifest["skipped"][0]["file"] == str(fasta)
    assert "unreadable in record 'chr4' (EOFError" in manifest["skipped"][0]["reason"]
    assert manifest["stats"]["bases"] == sum(map(len, genome_records().values()))  # chr4 contributes nothing


def test_truncated_fasta_fails_under_the_default_skip_fraction(tmp_path):
    fasta = truncated_fasta(tmp_path)
    with pytest.raises(ValueError, match="1 of 4 inputs are bad.*--max-skip-fraction.*unreadable in record 'chr4'"):
        prep_genome(fasta, tmp_path / "out", bed=None, tokenizer="kmer6", val_chroms=["chr2"], test_chroms=[],
                    seq_len=SEQ_LEN, options=PrepOptions(workers=1, progress=False))
    bed = write_bed(tmp_path / "x.bed", [("chr4", 0, 5000, "train"), ("chr1", 0, 100, "valid")])
    with pytest.raises(ValueError, match="1 of 2 inputs are bad.*chromosome 'chr4' not read: truncated.fa.gz is"):
        prep_genome(fasta, tmp_path / "out", bed=bed, tokenizer="kmer6", val_chroms=[], test_chroms=[],
                    seq_len=SEQ_LEN, options=PrepOptions(workers=1, progress=False))


def test_a_file_that_is_not_fasta_fails_with_one_line(tmp_path):
    path = tmp_path / "notes.fa"
    path.write_text("ACGT\nthis is not a FASTA file\n")
    with pytest.raises(ValueError, match="1 of 1 inputs are bad.*no '>' header"):
        prep_genome(path, tmp_path / "out", bed=None, tokenizer="char", val_chroms=["chr1"], test_chroms=[],
                    options=options())


# ----------------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("mode", ["bed", "windows"])
def test_shards_merge_into_the_single_prep(genome, tmp_path, mode, monkeypatch):
    monkeypatch.setattr("data_prep.genome.UNIT_BASES", 1000)
    bed = genome["bed"] if mode == "bed" else None
    val = [] if bed else ["chr2"]

    def run(out: Path, **kw) -> dict:
        return prep_genome(genome["fasta"], out, bed=bed, tokenizer="kmer6", val_chroms=val, test_chroms=[],
                           seq_len=SEQ_LEN, options=options(**kw))

    single = run(tmp_path / "single")
    parts = [tmp_path / "part0", tmp_path / "part1"]
    for i, part in enumerate(parts):
        run(part, shard_index=i, num_shards=2)
    assert {json.loads((p / "manifest.json").read_text())["items"] for p in parts} != {0}
    merged = merge_parts(tmp_path / "merged", parts[::-1])
    assert shard_samples(tmp_path / "merged") == shard_samples(tmp_path / "single")
    assert merged["splits"] == single["splits"] and merged["items"] == single["items"]
    assert sorted(map(str, merged["skipped"])) == sorted(map(str, single["skipped"]))
    assert merged["stats"] == single["stats"]


# ---------------------------------------------------------------------------------------------------------- CLI


def test_cli_prep_genome(genome, tmp_path, capsys):
    from launch.cli import main

    out = tmp_path / "out"
    argv = ["prep", "genome", "--fasta", str(genome["fasta"]), "--bed", str(genome["bed"]), "--out", str(out),
            "--seq-len", str(SEQ_LEN), "--workers", "1", "--no-progress", "--max-skip-fraction", "0.25"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert f"train {manifest['splits']['train']['samples']:,} samples" in printed and "2 inputs skipped" in printed
    assert main(argv) == 0 and "nothing to do" in capsys.readouterr().out
    assert main(["prep", "genome", "--fasta", str(genome["fasta"]), "--out", str(tmp_path / "o2")]) == 2
    assert "--val-chroms" in capsys.readouterr().err



def test_a_malformed_first_bed_row_is_skipped_and_counted_not_taken_for_a_header(tmp_path):
    path = tmp_path / "x.bed"
    for text, header in [("chrom start end split\nchr1 0 10 train\n", True),  # HyenaDNA's header line
                         ("chrom\tchromStart\tchromEnd\tsplit\nchr1 0 10 train\n", True),
                         ("#chrom start end split\nchr1 0 10 train\n", True),
                         ("chr1 12x 500 train\nchr1 0 10 train\n", False),  # garbled data, not column names
                         ("chr1 -5 500 train\nchr1 0 10 train\n", False),
                         ("chr1 0\nchr1 0 10 train\n", False)]:
        path.write_text(text)
        rows = read_bed(path)
        assert [(r.chrom, r.start, r.end) for r in rows if not r.error] == [("chr1", 0, 10)], text
        assert len([r for r in rows if r.error]) == (0 if header else 1), text
    path.write_text("chr1 12x 500 train\n" + "".join(f"chr1 {i} {i + 20} train\n" for i in range(150)))
    records = {"chr1": "ACGT" * 100}
    fasta = write_fasta(tmp_path / "g.fa", records)
    manifest = prep_genome(fasta, tmp_path / "out", bed=path, tokenizer="char", val_chroms=[], test_chroms=[],
                           seq_len=SEQ_LEN, options=options())
    assert manifest["items"] == 151
    assert manifest["skipped"] == [{"file": f"{path}:1", "reason": "start and end must be whole numbers; got 12x 500"}]
