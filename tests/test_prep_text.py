"""Text prep on real archive formats built here: OWT-style xz tarballs, jsonl(.gz/.zst), parquet, .txt folders."""

import gzip
import io
import json
import lzma
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.contract import read_manifest
from data_prep.mds import read_split
from data_prep.parallel import PrepOptions
from data_prep.shards import merge_parts
from data_prep.text import in_validation, prep_text
from data_prep.tokenizers import load_tokenizer
from launch.cli import main as pope_main

WORDS = ("the quick brown fox jumps over a lazy dog while music plays in köln — naïve café 東京 🎵 "
         "transformers learn positions 12345 and\tphases").split(" ")


def make_docs(count, seed):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(count):
        lines = [" ".join(rng.choice(WORDS, size=rng.integers(3, 30))) for _ in range(rng.integers(1, 6))]
        docs.append(f"Document {seed}-{i}.\n" + "\n\n".join(lines) + ("  \n" if i % 3 == 0 else ""))
    return docs


def xz_subset(docs, prefix):
    """An OpenWebText subset: an xz-compressed tar of .txt files, one document each."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for i, doc in enumerate(docs):
            data = doc.encode() if isinstance(doc, str) else doc
            info = tarfile.TarInfo(f"{prefix}-{i:04d}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return lzma.compress(raw.getvalue())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    subsets = {f"urlsf_subset00-{k}_data.xz": make_docs(30, k) for k in range(4)}
    folder = root / "owt"
    folder.mkdir()
    for name, docs in subsets.items():
        (folder / name).write_bytes(xz_subset(docs, name[:-3]))
    tarball = root / "openwebtext.tar.xz"
    with tarfile.open(tarball, "w:xz") as tar:
        for name in subsets:
            tar.add(folder / name, arcname=f"openwebtext/{name}")
    jsonl_docs = make_docs(40, 10)
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(jsonl_docs)]
    (root / "a.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    import zstandard

    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress("\n".join(lines[:20]).encode()))
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet_docs = make_docs(25, 20)
    pq.write_table(pa.table({"text": parquet_docs, "n": list(range(25))}), root / "c.parquet")
    txt = root / "txt"
    txt.mkdir()
    txt_docs = make_docs(12, 30)
    for i, doc in enumerate(txt_docs):
        (txt / f"{i:03d}.txt").write_text(doc)
    return {"root": root, "folder": folder, "tarball": tarball, "subsets": subsets, "jsonl": jsonl_docs,
            "parquet": parquet_docs, "txt_dir": txt, "txt": txt_docs}


def opts(**kw):
    return PrepOptions(**{"workers": 1, "progress": False, **kw})


def samples(out, split):
    return [s.astype(np.int64) for s in read_split(Path(out) / split)]


def documents(out, split):
    """Decode a split back into documents: concatenate its samples, cut at EOS."""
    tokenizer = load_tokenizer(out)
    stream = np.concatenate(samples(out, split)) if (Path(out) / split).exists() else np.array([], np.int64)
    cuts = np.flatnonzero(stream == tokenizer.info.eos)
    pieces = [p[:-1] if p[-1] == tokenizer.info.eos else p for p in np.split(stream, cuts + 1) if len(p)]
    return [tokenizer.decode(p) for p in pieces]  # the last EOS may be lost (see assert_documents)


def assert_documents(got, want, merges_allowed):
    """got == want, except that a chunk whose packing ended on a lone EOS loses it (a 1-token sample has no
    target), which joins its last document to the next one: at most `merges_allowed` such joins."""
    joins, want = 0, iter(want)
    for doc in got:
        whole = next(want)
        while whole != doc:
            assert doc.startswith(whole), (doc[:80], whole[:80])
            whole += next(want)
            joins += 1
    assert next(want, None) is None and joins <= merges_allowed


def expected_split(unit_docs, seed, fraction):
    train, val = [], []
    for unit, docs in unit_docs:
        for i, doc in enumerate(docs):
            (val if in_validation(seed, unit, i, fraction) else train).append(doc)
    return train, val


def test_owt_folder_round_trip_and_disjoint_splits(corpus, tmp_path):
    out = tmp_path / "owt"
    manifest = prep_text([corpus["folder"]], out, vocab_size=400, val_fraction=0.2, seq_len=64, options=opts())
    train, val = documents(out, "train"), documents(out, "val")
    want_train, want_val = expected_split(corpus["subsets"].items(), 1234, 0.2)
    assert train == want_train and val == want_val
    assert val and train and not set(train) & set(val)
    for split in ("train", "val"):
        got = samples(out, split)
        assert manifest["splits"][split] == {"samples": len(got), "tokens": int(sum(map(len, got)))}
        assert all(2 <= len(s) <= 65 for s in got) and sum(len(s) == 65 for s in got) >= len(got) - 8
    assert manifest["tokenizer"] == {"kind": "sentencepiece", "file": "spm.model"}
    assert manifest["vocab_size"] == 400 and manifest["dtype"] == "uint16"
    assert manifest["special_ids"] == {"pad": 3, "bos": 1, "eos": 2}
    assert len(manifest["inputs"]) == 4 and all(len(i["hash"]) == 32 for i in manifest["inputs"])
    assert manifest["skipped"] == [] and manifest["stats"]["documents"] == 120


def test_original_tarball_equals_folder(corpus, tmp_path):
    out = tmp_path / "tar"
    prep_text([corpus["tarball"]], out, vocab_size=400, val_fraction=0.2, seq_len=64, options=opts(workers=2))
    names = [(f"openwebtext.tar.xz/openwebtext/{k}", v) for k, v in corpus["subsets"].items()]
    want_train, want_val = expected_split(names, 1234, 0.2)
    assert documents(out, "train") == want_train and documents(out, "val") == want_val
    assert read_manifest(out)["inputs"][0]["path"].endswith("openwebtext.tar.xz")


def test_jsonl_parquet_txt_round_trip(corpus, tmp_path):
    root = corpus["root"]
    inputs = [root / "a.jsonl.gz", root / "b.jsonl.zst", root / "c.parquet", corpus["txt_dir"]]
    out = tmp_path / "mixed"
    manifest = prep_text(inputs, out, vocab_size=400, val_fraction=0.0, seq_len=128, options=opts(workers=2))
    want = corpus["jsonl"] + corpus["jsonl"][:20] + corpus["parquet"] + corpus["txt"]
    assert documents(out, "train") == want
    assert manifest["stats"]["documents"] == len(want) and "val" not in manifest["splits"]


def _gpt2_files(tmp_path, docs):
    """A byte-level BPE trained here and saved as GPT-2's vocab.json + merges.txt (never downloaded)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=500, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(tmp_path))
    return tmp_path / "vocab.json", tmp_path / "merges.txt"


def test_gpt2_bpe_from_local_files(corpus, tmp_path):
    vocab, merges = _gpt2_files(tmp_path, corpus["jsonl"])
    out = tmp_path / "gpt2"
    docs = corpus["jsonl"] + ["a document quoting <|endoftext|> literally"]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    manifest = prep_text([tmp_path / "d.jsonl"], out, tokenizer="gpt2", gpt2_vocab=vocab, gpt2_merges=merges,
                         val_fraction=0.0, seq_len=32, options=opts())
    assert documents(out, "train") == docs  # the literal separator inside a document is ordinary text
    assert manifest["tokenizer"]["kind"] == "gpt2" and manifest["special_ids"]["eos"] == 0
    with pytest.raises(ValueError, match="--gpt2-vocab must name a local file"):
        prep_text([tmp_path / "d.jsonl"], tmp_path / "x", tokenizer="gpt2", gpt2_vocab=tmp_path / "no.json",
                  gpt2_merges=merges, options=opts())


def test_rerun_is_noop_other_args_refuse_overwrite_replaces(corpus, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["prep", "text", "--input", str(corpus["txt_dir"]), "--out", str(out), "--vocab-size", "400",
            "--workers", "1", "--no-progress"]
    assert pope_main(base + ["--seq-len", "32"]) == 0
    assert "train" in capsys.readouterr().out
    done = (out / "DONE").stat().st_mtime_ns
    assert pope_main(base + ["--seq-len", "32"]) == 0
    assert "nothing to do" in capsys.readouterr().out and (out / "DONE").stat().st_mtime_ns == done
    assert pope_main(base + ["--seq-len", "48"]) == 2
    err = capsys.readouterr().err
    assert "already holds a prep with different seq_len" in err and "--overwrite" in err
    assert pope_main(base + ["--seq-len", "48", "--overwrite"]) == 0
    assert read_manifest(out)["seq_len"] == 48
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_inputs_are_listed_and_the_fraction_enforced(corpus, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = make_docs(20, 40)
    (bad / "urlsf_subset01-0_data.xz").write_bytes(xz_subset(good + [b"caf\xe9 latin-1 bytes"], "s0"))
    broken = make_docs(20, 41)
    (bad / "urlsf_subset01-1_data.xz").write_bytes(xz_subset(broken, "s1")[:-200])  # truncated xz
    (bad / "d.jsonl.gz").write_bytes(gzip.compress(b'{"text": "fine"}\n{not json\n{"title": "no text"}\n'))
    with pytest.raises(ValueError, match=r"inputs are bad .* more than --max-skip-fraction=0.01"):
        prep_text([bad], tmp_path / "strict", vocab_size=400, val_fraction=0, seq_len=32, options=opts())
    assert not (tmp_path / "strict").exists()
    manifest = prep_text([bad], tmp_path / "lenient", vocab_size=400, val_fraction=0, seq_len=32,
                         options=opts(max_skip_fraction=0.5))
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert reasons["urlsf_subset01-0_data.xz:s0-0020.txt"] == "invalid UTF-8 at byte 3"
    # The documents read whole before the break stand; the rest of the archive is one bad input.
    damage = re.fullmatch(r"damaged after (\d+) documents: (EOFError|LZMAError|ReadError): .*; the rest skipped",
                          reasons["urlsf_subset01-1_data.xz"])
    kept = int(damage.group(1))
    assert 0 < kept < 20
    assert reasons["d.jsonl.gz:line 2"] == "invalid JSON"
    assert reasons["d.jsonl.gz:line 3"] == "no string field 'text'"
    assert documents(tmp_path / "lenient", "train") == ["fine"] + good + broken[:kept]
    assert manifest["items"] == 3 + 21 + kept + 1 and len(manifest["skipped"]) == 4


def test_sharded_prep_and_merge_equal_single_prep(corpus, tmp_path):
    inputs = [corpus["folder"], corpus["root"] / "a.jsonl.gz", corpus["txt_dir"]]
    single = tmp_path / "single"
    prep_text(inputs, single, vocab_size=400, val_fraction=0.2, seq_len=64, options=opts(workers=2))
    model = single / "tokenizer" / "spm.model"
    with pytest.raises(ValueError, match="sharded prep needs one tokenizer"):
        prep_text(inputs, tmp_path / "p", val_fraction=0.2, seq_len=64, options=opts(num_shards=2))
    parts = []
    for index in range(3):
        part = tmp_path / f"part{index}"
        prep_text(inputs, part, tokenizer_model=model, val_fraction=0.2, seq_len=64,
                  options=opts(shard_index=index, num_shards=3))
        parts.append(part)
    with pytest.raises(ValueError, match="missing"):
        merge_parts(tmp_path / "incomplete", parts[:2])
    merged = tmp_path / "merged"
    manifest = merge_parts(merged, parts[::-1])
    assert merge_parts(merged, parts) is None  # already merged
    for split in ("train", "val"):
        a, b = samples(single, split), samples(merged, split)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
        assert manifest["splits"][split] == read_manifest(single)["splits"][split]
    assert documents(merged, "train") == documents(single, "train")


def test_killed_prep_leaves_no_done_and_rerun_completes(tmp_path):
    data = tmp_path / "big"
    data.mkdir()
    for k in range(120):
        docs = make_docs(60, 100 + k)
        (data / f"{k:03d}.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "launch.cli", "prep", "text", "--input", str(data), "--out", str(out),
           "--vocab-size", "400", "--seq-len", "16", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parent.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(tmp_path.glob(".out.tmp-*/tokenizer/spm.model")):
        time.sleep(0.005)
    time.sleep(0.3)  # the tokenizer is trained and saved: the prep is now writing samples
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any(tmp_path.glob(".out.tmp-*")), "the prep finished before it could be killed"
    assert not out.exists()
    assert subprocess.run(cmd, cwd=Path(__file__).parent.parent, capture_output=True).returncode == 0
    assert (out / "DONE").is_file() and not any(tmp_path.glob(".out.tmp-*"))


def test_workers_do_not_change_the_output(corpus, tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        prep_text([corpus["folder"], corpus["txt_dir"]], out, tokenizer_model=None, vocab_size=400, val_fraction=0.1,
                  seq_len=64, options=opts(workers=workers))
        outs.append(out)
    for split in ("train", "val"):
        a, b = samples(outs[0], split), samples(outs[1], split)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_no_sample_and_missing_inputs_fail_with_one_line(tmp_path):
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="does not exist"):
        prep_text([tmp_path / "missing"], tmp_path / "o", options=opts())
    with pytest.raises(ValueError, match="no readable document|no sample"):
        prep_text([tmp_path / "empty.jsonl"], tmp_path / "o", vocab_size=400, options=opts())


def test_repeated_file_names_across_inputs_are_refused(tmp_path):
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(ValueError, match="several inputs hold a file named 'a.jsonl'"):
        prep_text([tmp_path / "d1", tmp_path / "d2"], tmp_path / "o", options=opts(num_shards=2))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 kB, so that files of a few tens of kB are cut into many (the default is 4 MiB)."""
    from data_prep import text

    monkeypatch.setattr(text, "CHUNK_BYTES", 3000)
    return text


def test_large_files_are_cut_into_chunks_without_changing_the_output(small_chunks, tmp_path):
    from data_prep.text import iter_units, unit_chunks

    data = tmp_path / "in"
    data.mkdir()
    # A blank line keeps its number; a line longer than a chunk is a chunk of its own.
    jsonl = make_docs(7, 50) + ["", "x" * 7000] + make_docs(150, 53)
    lines = [json.dumps({"text": d}) if d else "" for d in jsonl]
    (data / "a.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))  # no newline at the end
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = make_docs(90, 51)
    pq.write_table(pa.table({"text": rows}), data / "b.parquet", row_group_size=25)
    subset = make_docs(60, 52)
    (data / "urlsf_subset02-0_data.xz").write_bytes(xz_subset(subset, "s"))  # compressed > 3 kB: streamed
    counts = {u.name: sum(1 for _ in unit_chunks(u, "text")) for u in iter_units([data])}
    assert all(n >= 3 for n in counts.values()), counts

    want_docs = [d for d in jsonl if d] + rows + subset
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        prep_text([data], outs[workers], vocab_size=400, val_fraction=0.15, seq_len=64,
                  options=opts(workers=workers))
    # The holdout hashes (file, document number): line numbers count the blank line.
    numbered = [("a.jsonl.gz", i, d) for i, d in enumerate(jsonl)]
    numbered += [("b.parquet", i, d) for i, d in enumerate(rows)]
    numbered += [("urlsf_subset02-0_data.xz", i, d) for i, d in enumerate(subset)]
    want_val = [d for f, i, d in numbered if d and in_validation(1234, f, i, 0.15)]
    want_train = [d for f, i, d in numbered if d and not in_validation(1234, f, i, 0.15)]
    assert sorted(want_train + want_val) == sorted(want_docs) and want_val
    assert_documents(documents(outs[1], "train"), want_train, sum(counts.values()))
    assert_documents(documents(outs[1], "val"), want_val, sum(counts.values()))
    for split in ("train", "val"):
        a, b = samples(outs[1], split), samples(outs[2], split)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    # Sharded by files and merged: exactly the single prep.
    model = outs[1] / "tokenizer" / "spm.model"
    parts = []
    for index in range(2):
        parts.append(tmp_path / f"part{index}")
        prep_text([data], parts[-1], tokenizer_model=model, val_fraction=0.15, seq_len=64,
                  options=opts(shard_index=index, num_shards=2, workers=2))
    merge_parts(tmp_path / "merged", parts)
    for split in ("train", "val"):
        a, b = samples(outs[1], split), samples(tmp_path / "merged", split)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))

    # Other chunk sizes cut elsewhere (packing restarts elsewhere) but hold out the same documents.
    small_chunks.CHUNK_BYTES = 1 << 20
    assert all(sum(1 for _ in unit_chunks(u, "text")) == 1 for u in iter_units([data]))
    prep_text([data], tmp_path / "big", tokenizer_model=model, val_fraction=0.15, seq_len=64, options=opts())
    assert_documents(documents(tmp_path / "big", "train"), want_train, 3)
    assert_documents(documents(tmp_path / "big", "val"), want_val, 3)


def test_jsonl_chunks_are_whole_lines_cut_by_content_alone(small_chunks, tmp_path):
    from data_prep.text import TextUnit, unit_chunks

    lines = [json.dumps({"text": "y" * n}) for n in (10, 2990, 5, 6000, 40, 1500, 1500, 1500, 3)]
    raw = ("\n".join(lines) + "\n").encode()
    (tmp_path / "a.jsonl").write_bytes(raw)
    (tmp_path / "a.jsonl.zst").write_bytes(__import__("zstandard").ZstdCompressor().compress(raw))
    cuts = {}
    for name in ("a.jsonl", "a.jsonl.zst"):
        unit = TextUnit(name, "jsonl", (str(tmp_path / name),))
        chunks = list(unit_chunks(unit, "text"))
        assert b"".join(c.data for c in chunks) == raw
        assert all(c.data.endswith(b"\n") and (len(c.data) <= 3000 or c.data.count(b"\n") == 1) for c in chunks)
        assert [c.first for c in chunks] == [0] + list(np.cumsum([c.data.count(b"\n") for c in chunks[:-1]]))
        cuts[name] = [len(c.data) for c in chunks]
    # Line sizes 23, 3003, 18, 6013, 53, 1513, 1513, 1513, 16: each cut is at the last newline within 3000 bytes
    # of the previous one, or after a longer line.
    assert cuts["a.jsonl"] == cuts["a.jsonl.zst"] == [23, 3003, 18, 6013, 53 + 1513, 1513, 1513 + 16]


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
def test_a_truncated_jsonl_keeps_the_lines_before_the_damage(small_chunks, tmp_path, codec):
    import zstandard

    docs = make_docs(200, 60)
    raw = "\n".join(json.dumps({"text": d}) for d in docs).encode()
    if codec == "gzip":
        packed, name = gzip.compress(raw), "t.jsonl.gz"
    else:  # several frames: the reader goes on past the first
        frame = zstandard.ZstdCompressor().compress
        packed, name = b"".join(frame(raw[i:i + 20000]) for i in range(0, len(raw), 20000)), "t.jsonl.zst"
    (tmp_path / name).write_bytes(packed[:len(packed) * 2 // 3])
    (tmp_path / "whole").mkdir()
    (tmp_path / "whole" / name).write_bytes(packed)
    whole = prep_text([tmp_path / "whole" / name], tmp_path / "o1", vocab_size=400, val_fraction=0, seq_len=64,
                      options=opts())
    assert whole["skipped"] == []
    assert_documents(documents(tmp_path / "o1", "train"), docs, len(raw) // 3000 + 1)
    manifest = prep_text([tmp_path / name], tmp_path / "o2", tokenizer_model=tmp_path / "o1/tokenizer/spm.model",
                         val_fraction=0, seq_len=64, options=opts(workers=2, max_skip_fraction=1.0))
    [skip] = manifest["skipped"]
    kept = int(re.fullmatch(r"damaged after (\d+) lines: \w+: .+; the rest skipped", skip["reason"]).group(1))
    assert skip["file"] == name and 0 < kept < 200
    assert_documents(documents(tmp_path / "o2", "train"), docs[:kept], kept)  # whole lines only, in order
    assert manifest["items"] == kept + 1


def test_outer_tarball_members_are_streamed_in_chunks(small_chunks, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep.text import _tokenizer_sample

    jsonl, rows = make_docs(80, 70), make_docs(40, 71)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps({"text": d}) for d in jsonl)
                                                              .encode()))
    pq.write_table(pa.table({"text": rows}), tmp_path / "m" / "b.parquet", row_group_size=10)
    with tarfile.open(tmp_path / "dump.tar", "w") as tar:
        for name in ("a.jsonl.gz", "b.parquet"):
            tar.add(tmp_path / "m" / name, arcname=f"dump/{name}")
    out = tmp_path / "o"
    manifest = prep_text([tmp_path / "dump.tar"], out, vocab_size=400, val_fraction=0, seq_len=64,
                         options=opts(workers=2))
    assert manifest["skipped"] == [] and manifest["stats"]["documents"] == 120
    assert_documents(documents(out, "train"), jsonl + rows, 40)
    # The tokenizer sample reads at most --tokenizer-sample-docs documents of a file: its first ones.
    first = [line for doc in jsonl[:5] for line in doc.split("\n") if line.strip()]
    assert _tokenizer_sample([tmp_path / "m" / "a.jsonl.gz"], 5, "text", 1234) == first
