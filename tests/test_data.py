"""The loader side: batches from raw samples, augmentations, dataset checks, the indirect indexing generator."""

import re

import numpy as np
import pytest
import torch

from data_prep.indirect import VOCAB, example, prep_indirect
from data_prep.mds import read_split
from data_prep.parallel import PrepOptions
from data_prep.tokenizers import load_tokenizer
from pipeline.config import Config, apply_overrides, resolve
from pipeline.data import BatchMaker, open_dataset
from pipeline.model import IGNORE_INDEX


@pytest.fixture(scope="module")
def indirect(tmp_path_factory):
    out = tmp_path_factory.mktemp("indirect") / "data"
    prep_indirect(out, train=300, val=50, test=50, seq_len=64, options=PrepOptions(workers=1, progress=False))
    return out


def config_for(path, *overrides):
    return apply_overrides(Config(), [f"data.path={path}", "model.vocab_size=0", *overrides])


def test_indirect_examples_are_correct(indirect):
    tokenizer = load_tokenizer(indirect)
    assert tokenizer.info.vocab_size == len(VOCAB) == 69
    samples = list(read_split(indirect / "val"))
    assert len(samples) == 50 and max(len(s) for s in samples) <= 52
    for sample in samples:
        assert sample[0] == tokenizer.info.bos
        text = tokenizer.decode(sample)
        letters, source, shift, target = re.fullmatch(r"([A-Za-z]+), ([A-Za-z]), ([+-]\d+), ([A-Za-z])", text).groups()
        assert 20 <= len(letters) <= 40 and len(set(letters)) == len(letters)
        assert -15 <= int(shift) <= 15 and letters[letters.index(source) + int(shift)] == target
    rng = np.random.default_rng(0)
    assert example(rng) != example(rng)


def test_indirect_is_deterministic_across_workers(indirect, tmp_path):
    other = tmp_path / "w2"
    prep_indirect(other, train=300, val=50, test=50, seq_len=64, options=PrepOptions(workers=2, progress=False))
    for split in ("train", "val", "test"):
        a, b = list(read_split(indirect / split)), list(read_split(other / split))
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_batch_maker_shifts_pads_and_masks(indirect):
    config = config_for(indirect, "data.seq_len=8")
    dataset = open_dataset(config)
    resolved = resolve(config, dataset.manifest)
    assert resolved.model.vocab_size == 69 and config.model.vocab_size == 0  # filled from the manifest, in a copy
    make = BatchMaker(config, dataset)
    inputs, targets = make([np.array([5, 6, 7]), np.arange(20, 40)])
    assert inputs.tolist()[0] == [5, 6] + [dataset.pad_id] * 6
    assert targets.tolist()[0] == [6, 7] + [IGNORE_INDEX] * 6
    assert inputs.tolist()[1] == list(range(20, 28)) and targets.tolist()[1] == list(range(21, 29))  # cropped
    last = BatchMaker(config_for(indirect, "data.seq_len=8", "data.loss_on=last"), dataset)
    _, targets = last([np.array([5, 6, 7])])
    assert targets.tolist()[0] == [IGNORE_INDEX, 7] + [IGNORE_INDEX] * 6


def test_open_dataset_and_resolve_refusals(indirect, tmp_path):
    with pytest.raises(ValueError, match="model.vocab_size=50257 but dataset"):
        config = apply_overrides(Config(), [f"data.path={indirect}"])
        resolve(config, open_dataset(config).manifest)
    with pytest.raises(ValueError, match="exceeds the prepared seq_len 64"):
        config = config_for(indirect, "data.seq_len=128", "model.max_seq_len=128")
        resolve(config, open_dataset(config).manifest)
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="no DONE marker"):
        open_dataset(config_for(tmp_path / "half"))
    with pytest.raises(ValueError, match="needs a DNA tokenizer"):
        BatchMaker(config_for(indirect, "data.reverse_complement=0.5"),
                   open_dataset(config_for(indirect, "data.seq_len=64", "model.max_seq_len=64")))


def test_augmentations_are_deterministic_per_step(tmp_path):
    from tiny_data import build

    genome, jsb = build("genome", tmp_path), build("jsb", tmp_path)
    config = config_for(genome, "data.seq_len=128", "model.max_seq_len=128", "data.reverse_complement=1.0")
    dataset = open_dataset(config)
    make, plain = BatchMaker(config, dataset), BatchMaker(config_for(genome, "data.seq_len=128"), dataset)
    samples = list(read_split(genome / "train"))[:4]
    a, b = make(samples, step=3), make(samples, step=3)
    assert torch.equal(a[0], b[0])
    tokenizer = load_tokenizer(genome)
    flipped = tokenizer.decode(a[0][0][a[0][0] != dataset.pad_id].numpy())
    other_strand = tokenizer.decode(samples[0])[::-1].translate(str.maketrans("ACGT", "TGCA"))
    assert len(flipped) > 600 and other_strand.startswith(flipped)
    assert not torch.equal(a[0], plain(samples, step=3)[0])
    config = config_for(jsb, "data.seq_len=256", "model.max_seq_len=256", "data.transpose=true")
    dataset = open_dataset(config)
    make = BatchMaker(config, dataset)
    samples = list(read_split(jsb / "train"))[:8]
    shifted = [make(samples, step=s)[0] for s in range(6)]
    assert torch.equal(shifted[0], make(samples, step=0)[0])
    assert any(not torch.equal(shifted[0], x) for x in shifted[1:])
    plain = BatchMaker(config_for(jsb, "data.seq_len=256", "model.max_seq_len=256"), dataset)(samples)[0]
    pitches = plain > 1  # ids 0 pad, 1 silence, 2.. pitches
    for row in range(len(samples)):  # each sample moves as a whole by one shift in -3..+3; silence stays
        shifts = (shifted[1][row] - plain[row])[pitches[row]].unique().tolist()
        assert len(shifts) == 1 and -3 <= shifts[0] <= 3
        assert torch.equal(shifted[1][row][~pitches[row]], plain[row][~pitches[row]])


def test_resume_at_an_epoch_boundary_continues_into_the_next_epoch(indirect):
    from pipeline.data import batches_forever, make_loader

    config = config_for(indirect, "data.seq_len=64", "model.max_seq_len=64", "data.micro_batch_size=50",
                        "data.num_workers=0")
    dataset = open_dataset(config)
    loader = make_loader(dataset, config.data, "train", train=True)
    epoch = [b["tokens"] for b in loader]  # 300 samples: exactly 6 batches
    assert len(epoch) == 6
    state = loader.state_dict()  # taken after the epoch's last batch
    resumed = make_loader(dataset, config.data, "train", train=True)
    resumed.load_state_dict(state)
    batch = next(batches_forever(resumed))  # the first pass is empty; the next epoch follows
    assert len(batch["tokens"]) == 50


def test_loss_on_last_refuses_to_cut_the_target(indirect):
    config = config_for(indirect, "data.seq_len=16", "model.max_seq_len=16", "data.loss_on=last")
    make = BatchMaker(config, open_dataset(config))
    with pytest.raises(ValueError, match="final token would be cut off"):
        make([np.arange(30)])
