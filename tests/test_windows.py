"""Windows: samples prepared at one seq_len trained at a shorter data.seq_len, every token a target once per epoch.

Real MDS data made by `prep_text` at seq_len 64, read at data.seq_len 16 (k = 4 windows per sample).
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, metrics, run_pope, synthetic_documents, tiny_train_args
from data_prep.mds import read_split
from data_prep.parallel import PrepOptions
from pipeline.config import Config, ModelConfig, apply_overrides
from pipeline.data import (BatchMaker, count_windows, cut_window, make_loader, open_dataset, sample_lengths,
                           windows_per_sample)
from pipeline.distributed import DistEnv
from pipeline.evaluate import evaluate
from pipeline.model import IGNORE_INDEX, Transformer

PREP_SEQ_LEN, SEQ_LEN = 64, 16


@pytest.fixture(scope="module")
def long_samples(tmp_path_factory) -> Path:
    """Text prepared at --seq-len 64: samples of 65 tokens, and a shorter last one where packing ends."""
    from data_prep.text import prep_text

    root = tmp_path_factory.mktemp("windows")
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in synthetic_documents(300, 0)))
    prep_text([root / "docs.jsonl"], root / "data", vocab_size=320, val_fraction=0.1, seq_len=PREP_SEQ_LEN,
              options=PrepOptions(workers=1, progress=False))
    return root / "data"


def config_for(path: Path, *overrides: str) -> Config:
    return apply_overrides(Config(), [f"data.path={path}", "model.vocab_size=0", f"data.seq_len={SEQ_LEN}",
                                      f"model.max_seq_len={SEQ_LEN}", "data.micro_batch_size=1",
                                      "data.num_workers=0", *overrides])


def windows_by_content(samples: list[np.ndarray], seq_len: int, per_sample: int) -> dict[tuple, list]:
    """Window tokens → the (sample, window) places holding exactly those tokens."""
    places: dict[tuple, list] = {}
    for s, tokens in enumerate(samples):
        for j in range(per_sample):
            places.setdefault(tuple(cut_window(tokens, j, seq_len).tolist()), []).append((s, j))
    return places


def epoch_windows(loader) -> list[tuple]:
    return [tuple(np.asarray(w).tolist()) for batch in loader for w in batch["tokens"]]


def test_every_token_is_a_target_once_per_epoch_in_shuffled_order(long_samples):
    config = config_for(long_samples, "data.num_workers=2")
    dataset = open_dataset(config)
    samples = list(read_split(long_samples / "train"))
    assert max(len(s) for s in samples) == PREP_SEQ_LEN + 1 and min(len(s) for s in samples) < 49  # one is short
    assert np.array_equal(sample_lengths(long_samples / "train"), [len(s) for s in samples])
    k = windows_per_sample(dataset, config.data)
    assert k == 4
    got = epoch_windows(make_loader(dataset, config.data, "train", train=True))
    assert len(got) == len(samples) * k
    # Map every window back to a (sample, window) place; each place is used once.
    places = windows_by_content(samples, SEQ_LEN, k)
    order = [places[w].pop() for w in got]
    assert all(not left for left in places.values())
    covered = Counter()
    for (s, j), window in zip(order, got):
        covered.update((s, j * SEQ_LEN + t) for t in range(1, len(window)))  # target positions in the sample
    assert covered == Counter((s, t) for s, tokens in enumerate(samples) for t in range(1, len(tokens)))
    # Shuffled as items: neighbours in the epoch are rarely windows of one sample, and windows are not in order.
    same = sum(a[0] == b[0] for a, b in zip(order, order[1:]))
    assert same < len(order) * 0.05 and [j for _, j in order[:40]] != sorted(j for _, j in order[:40])
    count = count_windows(dataset, config.data, "train")
    empty = sum(1 for w in got if not w)
    assert (count.samples, count.per_sample, count.empty, count.windows) == (len(samples), k, empty, len(got))
    assert empty >= 1 and f"{len(got):,} windows of {SEQ_LEN + 1} tokens per epoch" in count.describe()


def test_two_ranks_share_the_windows_of_an_epoch_disjointly(long_samples, tmp_path):
    """Two processes as ranks 0 and 1 of one node (streaming reads RANK, WORLD_SIZE and LOCAL_* and joins them in
    a gloo group): their shares partition the epoch's windows."""
    import socket

    script = ("import json, sys\n"
              "sys.path.insert(0, 'tests')\n"
              "from test_windows import config_for, epoch_windows\n"
              "from pipeline.data import make_loader, open_dataset\n"
              f"config = config_for({str(long_samples)!r})\n"
              "loader = make_loader(open_dataset(config), config.data, 'train', train=True)\n"
              "json.dump(epoch_windows(loader), open(sys.argv[1], 'w'))\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(tmp_path / f"rank{rank}.json")],
                                      cwd=ROOT, env=env))
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    shares = [Counter(tuple(w) for w in json.loads((tmp_path / f"rank{r}.json").read_text())) for r in (0, 1)]
    samples = list(read_split(long_samples / "train"))
    every = Counter(tuple(cut_window(s, j, SEQ_LEN).tolist()) for s in samples for j in range(4))
    assert sum(shares[0].values()) == sum(shares[1].values()) == len(samples) * 2
    # Together exactly the epoch's windows, each as often as the data holds it (the text repeats phrases, so
    # equal windows occur in different places): no place is in both shares, none in neither.
    assert shares[0] + shares[1] == every


def test_resume_mid_epoch_continues_with_the_same_windows(long_samples):
    config = config_for(long_samples, "data.micro_batch_size=8")
    dataset = open_dataset(config)
    straight = epoch_windows(make_loader(dataset, config.data, "train", train=True))
    loader = make_loader(dataset, config.data, "train", train=True)
    first = []
    for batch in loader:
        first += [tuple(np.asarray(w).tolist()) for w in batch["tokens"]]
        if len(first) == 8 * 37:
            break
    resumed = make_loader(dataset, config.data, "train", train=True)
    resumed.load_state_dict(loader.state_dict())
    assert first + epoch_windows(resumed) == straight


def test_validation_covers_every_token_and_padding_windows_have_no_loss(long_samples):
    config = config_for(long_samples, "data.micro_batch_size=4")
    dataset = open_dataset(config)
    samples = list(read_split(long_samples / "val"))
    loader = make_loader(dataset, config.data, "val", train=False)
    assert Counter(epoch_windows(loader)) == Counter(
        tuple(cut_window(s, j, SEQ_LEN).tolist()) for s in samples for j in range(4))
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=dataset.vocab_size, d_model=32, n_heads=2, n_layers=1,
                                    max_seq_len=SEQ_LEN)).eval()
    make = BatchMaker(config, dataset)
    result = evaluate(model, loader, make, DistEnv())
    assert result["val/tokens"] == sum(len(s) - 1 for s in samples)
    # A micro-batch of padding windows only: no target, loss 0 and a zero gradient rather than NaN.
    inputs, targets = make([np.zeros(0, np.uint16), np.array([7], np.uint16)])
    assert (targets == IGNORE_INDEX).all() and (inputs == dataset.pad_id).all()
    model.train()
    _, loss = model(inputs, targets)
    loss.backward()
    assert float(loss.detach()) == 0.0 and all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_loss_on_last_keeps_whole_samples(tmp_path):
    from data_prep.indirect import prep_indirect

    out = tmp_path / "indirect"
    prep_indirect(out, train=60, val=10, test=10, seq_len=64, options=PrepOptions(workers=1, progress=False))
    config = config_for(out, "data.loss_on=last", "data.seq_len=56", "model.max_seq_len=56")
    dataset = open_dataset(config)
    assert windows_per_sample(dataset, config.data) == 1
    got = epoch_windows(make_loader(dataset, config.data, "train", train=True))
    assert Counter(got) == Counter(tuple(s.tolist()) for s in read_split(out / "train"))
    assert "60 windows of 57 tokens per epoch from 60 samples (1 per sample; 0 empty" in count_windows(
        dataset, config.data, "train").describe()


@pytest.mark.slow
def test_windowed_run_resumes_bit_for_bit(long_samples, tmp_path):
    from test_train import final_weights, kill_after_step, losses_by_step

    common = [f"data.seq_len={SEQ_LEN}", f"model.max_seq_len={SEQ_LEN}", "deepspeed.zero_stage=2",
              "schedule.max_steps=12", "checkpoint.every=4", "eval.every=6", "model.dropout=0.1",
              "checkpoint.keep_last=5", "eval.max_batches=4"]
    straight = run_pope(*tiny_train_args(long_samples, tmp_path, "straight", *common))
    assert "train: 6,632 windows of 17 tokens per epoch from 1,658 samples (4 per sample; 1 empty" in straight.stdout
    assert "val: " in straight.stdout and "windows of 17 tokens per epoch" in straight.stdout
    args = tiny_train_args(long_samples, tmp_path, "killed", *common)
    kill_after_step(args, tmp_path / "killed", 6)
    resumed = run_pope(*args)
    assert "resumed from step" in resumed.stdout
    straight_losses, killed = losses_by_step(tmp_path / "straight"), losses_by_step(tmp_path / "killed")
    assert sorted(straight_losses) == list(range(1, 13)) and killed == straight_losses
    a, b = final_weights(tmp_path / "straight", 12), final_weights(tmp_path / "killed", 12)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all("val/loss" not in m or np.isfinite(m["val/loss"]) for m in metrics(tmp_path / "killed"))
    # Another number of windows per sample would point the saved data position elsewhere: refused.
    proc = run_pope(*args, "schedule.max_steps=14", "data.seq_len=8", check=False)
    assert proc.returncode == 2 and "counts 4 window(s) per prepared sample, data.seq_len now cuts 8" in proc.stderr


def test_sample_lengths_of_compressed_shards(tmp_path):
    """Counting windows reads offset tables; a zstd shard not yet unpacked is read through streaming's decompress."""
    from data_prep.indirect import prep_indirect

    out, plain = tmp_path / "zstd", tmp_path / "plain"
    prep_indirect(out, train=60, val=10, test=10, seq_len=64,
                  options=PrepOptions(workers=1, progress=False, compression="zstd"))
    prep_indirect(plain, train=60, val=10, test=10, seq_len=64, options=PrepOptions(workers=1, progress=False))
    assert not list((out / "train").glob("*.mds")) and list((out / "train").glob("*.mds.zstd"))
    lengths = sample_lengths(out / "train")
    assert np.array_equal(lengths, [len(s) for s in read_split(plain / "train")]) and len(lengths) == 60


def test_sample_lengths_across_length_field_widths(tmp_path):
    """MDS stores a sample's length in 1, 2 or 4 bytes depending on its size; all are read back right."""
    from data_prep.mds import open_writer

    lengths = [2, 255, 256, 3, 65535, 65536, 70001, 17]
    for dtype in (np.uint16, np.uint32):
        with open_writer(tmp_path / np.dtype(dtype).name, np.dtype(dtype)) as writer:
            for n in lengths:
                writer.write({"tokens": np.arange(n, dtype=dtype) % 300})
        assert sample_lengths(tmp_path / np.dtype(dtype).name).tolist() == lengths
