"""The shared shard writer: atomic publish, the skip fraction, dtypes, idempotence, merge checks."""

import json

import numpy as np
import pytest

from data_prep.contract import DONE, manifest_hash, read_manifest, token_dtype
from data_prep.mds import import_streaming, read_split
from data_prep.parallel import PrepOptions, pack, shard_slice
from data_prep.shards import ShardWriter, TokenizerInfo, already_done, merge_parts


def write(out, samples, *, vocab=100, args=None, skipped=0, items=None, max_skip=0.01, seq_len=8):
    args = args or {"a": 1}
    with ShardWriter(out, corpus="toy", args=args, tokenizer=TokenizerInfo("char", vocab, pad=0),
                     seq_len=seq_len) as writer:
        for split, sample in samples:
            writer.write(split, np.asarray(sample))
        for k in range(skipped):
            writer.skip(f"file{k}", "broken")
        writer.items = items if items is not None else len(samples) + skipped
        return writer.publish(max_skip)


def test_publish_writes_manifest_done_and_splits(tmp_path):
    out = tmp_path / "d"
    manifest = write(out, [("train", [1, 2, 3]), ("train", [4, 5]), ("val", [6, 7, 8, 9])])
    assert (out / DONE).is_file() and read_manifest(out) == manifest
    assert manifest["splits"] == {"train": {"samples": 2, "tokens": 5}, "val": {"samples": 1, "tokens": 4}}
    assert [s.tolist() for s in read_split(out / "train")] == [[1, 2, 3], [4, 5]]
    assert read_split(out / "val").__next__().dtype == np.uint16
    assert len(manifest_hash(out)) == 16
    assert not list(tmp_path.glob(".d.tmp-*"))


def test_large_vocab_uses_uint32(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    write(tmp_path / "d", [("train", [70000, 1])], vocab=70001)
    assert next(read_split(tmp_path / "d" / "train")).tolist() == [70000, 1]
    assert read_manifest(tmp_path / "d")["dtype"] == "uint32"


def test_failures_leave_no_dataset(tmp_path):
    with pytest.raises(ValueError, match="2 of 3 inputs are bad .* first: file0: broken"):
        write(tmp_path / "a", [("train", [1, 2])], skipped=2)
    with pytest.raises(ValueError, match="no sample was produced"):
        write(tmp_path / "b", [])
    with pytest.raises(ValueError, match="2..9 tokens"):
        write(tmp_path / "c", [("train", list(range(10)))])
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "e", corpus="toy", args={}, tokenizer=TokenizerInfo("char", 9), seq_len=4) as w:
            w.write("train", np.array([1, 2]))
            raise RuntimeError("killed mid-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    write(tmp_path / "ok", [("train", [1, 2])], skipped=1, items=200)  # 0.5% bad: within 1%


def test_already_done_semantics(tmp_path):
    out = tmp_path / "d"
    assert not already_done(out, "toy", {"a": 1}, overwrite=False)
    write(out, [("train", [1, 2])], args={"a": 1, "b": [1, 2]})
    assert already_done(out, "toy", {"a": 1, "b": [1, 2]}, overwrite=False)
    with pytest.raises(ValueError, match="already holds a prep with different b"):
        already_done(out, "toy", {"a": 1, "b": [3]}, overwrite=False)
    assert not already_done(out, "toy", {"a": 2, "b": [1, 2]}, overwrite=True)
    (out / DONE).unlink()
    with pytest.raises(ValueError, match="not a finished prep"):
        already_done(out, "toy", {"a": 1, "b": [1, 2]}, overwrite=False)
    with pytest.raises(ValueError, match="no DONE marker"):
        read_manifest(out)


def test_stale_temporary_of_a_dead_process_is_removed(tmp_path):
    import socket

    stale = tmp_path / f".d.tmp-{socket.gethostname()}-999999999"
    stale.mkdir()
    write(tmp_path / "d", [("train", [1, 2])])
    assert not stale.exists()


def test_merge_refuses_mismatched_parts(tmp_path):
    a = write(tmp_path / "a", [("train", [1, 2])], args={"x": 1, "shard_index": 0, "num_shards": 2})
    write(tmp_path / "b", [("train", [3, 4])], args={"x": 2, "shard_index": 1, "num_shards": 2})
    with pytest.raises(ValueError, match="prepared with other arguments"):
        merge_parts(tmp_path / "m", [tmp_path / "a", tmp_path / "b"])
    write(tmp_path / "c", [("train", [3, 4]), ("val", [5, 6])], args={"x": 1, "shard_index": 1, "num_shards": 2})
    merged = merge_parts(tmp_path / "m", [tmp_path / "c", tmp_path / "a"])
    assert [s.tolist() for s in read_split(tmp_path / "m" / "train")] == [[1, 2], [3, 4]]
    assert merged["splits"]["val"] == {"samples": 1, "tokens": 2} and a["corpus"] == merged["corpus"]
    assert json.loads((tmp_path / "m" / "train" / "index.json").read_text())["shards"][0]["raw_data"][
        "basename"].startswith("part-00000/")
    streaming = import_streaming()  # the merged index is what training reads
    dataset = streaming.StreamingDataset(local=str(tmp_path / "m" / "train"), shuffle=False, batch_size=1)
    assert [dataset[i]["tokens"].tolist() for i in range(len(dataset))] == [[1, 2], [3, 4]]


def test_pack_and_shard_slice():
    parts = pack(np.arange(10), 4)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [p.tolist() for p in pack(np.arange(9), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a lone token: no target
    units = list(range(10))
    blocks = [shard_slice(units, i, 3) for i in range(3)]
    assert sum(blocks, []) == units and [len(b) for b in blocks] == [3, 3, 4]
    with pytest.raises(ValueError, match="--shard-index"):
        PrepOptions(shard_index=2, num_shards=2)


def test_an_empty_shard_publishes_and_merges(tmp_path):
    empty = write(tmp_path / "p0", [], args={"x": 1, "shard_index": 0, "num_shards": 2}, items=0)
    assert empty["splits"] == {}
    write(tmp_path / "p1", [("train", [1, 2])], args={"x": 1, "shard_index": 1, "num_shards": 2})
    merged = merge_parts(tmp_path / "m", [tmp_path / "p0", tmp_path / "p1"])
    assert merged["splits"] == {"train": {"samples": 1, "tokens": 2}}
    with pytest.raises(ValueError, match="no sample was produced"):  # unsharded: an empty result is an error
        write(tmp_path / "e", [], items=0)


def test_pruning_keeps_good_checkpoints_and_drops_a_damaged_future(tmp_path):
    import json as _json

    from pipeline.checkpoint import MARKER, SAVING, Checkpointer, tag_for
    from pipeline.distributed import DistEnv

    folder = tmp_path / "checkpoints"
    for step in (250, 500, 1000):  # 1000: complete once, damaged since, skipped by the resume from 500
        (folder / tag_for(step)).mkdir(parents=True)
        (folder / tag_for(step) / MARKER).write_text(_json.dumps({"step": step, "identity": {}, "files": {}}))
        (folder / tag_for(step) / SAVING).write_text("{}")  # saved by this program
    (folder / tag_for(600)).mkdir()  # an interrupted save of this program (SAVING.json)
    (folder / tag_for(600) / SAVING).write_text("{}")
    (folder / tag_for(700)).mkdir()  # a folder this program did not write: never pruned
    (folder / tag_for(700) / "weights.pt").write_bytes(b"theirs")
    checkpoints = Checkpointer(folder, DistEnv(), keep_last=1)
    (folder / tag_for(750)).mkdir()
    (folder / tag_for(750) / MARKER).write_text(_json.dumps({"step": 750, "identity": {}, "files": {}}))
    (folder / tag_for(750) / SAVING).write_text("{}")
    checkpoints._prune(750)
    assert sorted(p.name for p in folder.iterdir()) == [tag_for(700), tag_for(750)]
