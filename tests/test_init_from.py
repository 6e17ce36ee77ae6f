"""Fine-tuning from weights (`init.from`): real source runs (2 processes, gloo, DeepSpeed), real exports, real data."""

import json
import subprocess

import pytest
import torch

from conftest import kill_after_step, metrics, run_pope, synthetic_documents, tiny_train_args
from pipeline.checkpoint import MARKER, tag_for
from pipeline.config import load_config
from pipeline.init_from import init_weights, state_checksum
from pipeline.model import Transformer

pytestmark = pytest.mark.slow

SOURCE_STEPS = 8


@pytest.fixture(scope="module")
def long_dataset(text_dataset, tmp_path_factory):
    """The tiny text corpus again, with the same SentencePiece model, in samples of 65 tokens (for seq_len 64)."""
    from data_prep.parallel import PrepOptions
    from data_prep.text import prep_text

    root = tmp_path_factory.mktemp("long_dataset")
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in synthetic_documents(300, 1)))
    prep_text([root / "docs.jsonl"], root / "data", tokenizer_model=text_dataset / "tokenizer" / "spm.model",
              val_fraction=0.1, seq_len=64, options=PrepOptions(workers=1, progress=False))
    return root / "data"


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A dataset whose SentencePiece model was trained on other text: the same vocab size, other ids."""
    from data_prep.parallel import PrepOptions
    from data_prep.text import prep_text

    root = tmp_path_factory.mktemp("other_tokenizer")
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": d.upper()}) for d in synthetic_documents(300, 2)))
    prep_text([root / "docs.jsonl"], root / "data", vocab_size=320, val_fraction=0.1, seq_len=64,
              options=PrepOptions(workers=1, progress=False))
    return root / "data"


@pytest.fixture(scope="module")
def source(text_dataset, tmp_path_factory):
    """An 8-step PoPE run (ZeRO-2, 2 processes, seq_len 32) and its export."""
    root = tmp_path_factory.mktemp("source")
    run_pope(*tiny_train_args(text_dataset, root, "src", "deepspeed.zero_stage=2", f"schedule.max_steps={SOURCE_STEPS}",
                              f"checkpoint.every={SOURCE_STEPS}", "schedule.warmup_steps=2", "eval.every=0"))
    run_pope("export", str(root / "src"), "--out", str(root / "export"))
    return root / "src", root / "export"


def fine_tune_args(data, run_dir, name, init, *extra):
    """The source's shape at four times its context (seq_len 64 on the longer samples), a constant LR."""
    return tiny_train_args(data, run_dir, name, f"init.from={init}", "data.seq_len=64", "model.max_seq_len=128",
                           "schedule.warmup_steps=1", "schedule.decay=constant", "optim.lr=6e-5", "eval.every=0",
                           *extra)


def fine_tune_config(data, tmp_path, init, *extra):
    config = load_config("tiny/owt_124m_pope", fine_tune_args(data, tmp_path, "ft", init, *extra)[2:])
    config.model.vocab_size = 320  # what pipeline.config.resolve takes from the data
    return config


def source_weights(source_run):
    from pipeline.run import load_run

    return load_run(source_run)[1]


@pytest.mark.parametrize("kind", ["run", "export"])
def test_fine_tune_model_holds_exactly_the_source_weights(source, long_dataset, tmp_path, kind):
    from pipeline.export import read_exported

    run, export = source
    expected = source_weights(run) if kind == "run" else read_exported(export)[1]
    config = fine_tune_config(long_dataset, tmp_path, run if kind == "run" else export)
    torch.manual_seed(0)
    model = Transformer(config.model)
    record = init_weights(config, model)
    state = model.state_dict()
    assert state.keys() == expected.keys() and len(expected) == record["tensors"]
    for name, tensor in expected.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor), name
    assert record["step"] == SOURCE_STEPS and record["kind"] == kind
    assert record["checksum"] == state_checksum(source_weights(run))  # the export holds the very same weights


def test_shape_and_meaning_mismatches_are_refused_in_one_line(source, long_dataset, tmp_path):
    run, _ = source
    cases = {
        "model.d_model=64": r"embed.weight is \(320, 32\) there, \(320, 64\) here \(model.d_model 32 → 64, ",
        "model.n_layers=3": r"blocks.2.attn_norm.weight \(32,\) is absent there",
        "model.position=rope": r"blocks.0.attn.*delta \(2, 16\) has no place here",
        "model.n_heads=4": r"blocks.0.attn.*delta is \(2, 16\) there, \(4, 8\) here",
    }
    for override, message in cases.items():
        config = fine_tune_config(long_dataset, tmp_path, run, override)
        with pytest.raises(ValueError, match=message) as err:
            init_weights(config, Transformer(config.model))
        assert "\n" not in str(err.value)
    # Through `pope train`: one line, exit status 2, nothing trained.
    proc = run_pope(*fine_tune_args(long_dataset, tmp_path, "bad", run, "model.d_model=64", "launch.nproc=1"),
                    check=False)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("pope: error: init.from") and "embed.weight is (320, 32) there, (320, 64) here" in line
    assert not any((tmp_path / "bad" / "checkpoints").glob("step*"))


def test_learned_positions_and_silent_meaning_changes_are_refused(text_dataset, long_dataset, tmp_path):
    """learned: no rows past the source's max_seq_len; rope -> none and rope heads keep shapes, not meaning."""
    from pipeline.init_from import Source, check_fits

    def source_of(**keys):
        config = fine_tune_config(long_dataset, tmp_path, "x")
        for key, value in keys.items():
            setattr(config.model, key, value)
        model = Transformer(config.model)
        return Source(tmp_path, "run", 4, config.model, model.state_dict(), text_dataset)

    def target(**keys):
        config = fine_tune_config(long_dataset, tmp_path, "x")
        for key, value in keys.items():
            setattr(config.model, key, value)
        return Transformer(config.model)

    with pytest.raises(ValueError, match="learned positions stop at the source's model.max_seq_len=32, this run "
                                         "asks for 128"):
        check_fits(source_of(position="learned", max_seq_len=32), target(position="learned", max_seq_len=128))
    with pytest.raises(ValueError, match="model.position is 'rope' there, 'none' here"):
        check_fits(source_of(position="rope"), target(position="none"))
    with pytest.raises(ValueError, match="model.n_heads is 2 there, 4 here"):
        check_fits(source_of(position="rope"), target(position="rope", n_heads=4))
    # What keeps every weight's meaning is allowed: a longer context and another base for RoPE/PoPE.
    check_fits(source_of(max_seq_len=32), target(max_seq_len=4096, position_base=5e5))
    # A shorter learned table changes its shape: refused by the shape check, naming it.
    with pytest.raises(ValueError, match=r"learned_positions.embedding.weight is \(128, 32\) there, \(64, 32\)"):
        check_fits(source_of(position="learned", max_seq_len=128), target(position="learned", max_seq_len=64))


def test_tokenizer_mismatch_and_damaged_source_are_refused(source, other_tokenizer, long_dataset, tmp_path):
    run, export = source
    for init in (run, export):
        config = fine_tune_config(other_tokenizer, tmp_path, init)
        with pytest.raises(ValueError, match=f"was not prepared with the tokenizer of init.from {init}"):
            init_weights(config, Transformer(config.model))
    # A checkpoint changed after it was written is the existing refusal, for init.from as for eval and export.
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(run), str(damaged)], check=True)
    model_states = damaged / "checkpoints" / tag_for(SOURCE_STEPS) / "mp_rank_00_model_states.pt"
    model_states.write_bytes(model_states.read_bytes()[:-8] + b"\0" * 8)
    config = fine_tune_config(long_dataset, tmp_path, damaged)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"), \
            pytest.raises(ValueError, match="has no complete checkpoint"):
        init_weights(config, Transformer(config.model))
    config = fine_tune_config(long_dataset, tmp_path, damaged, f"init.step={SOURCE_STEPS}")
    with pytest.raises(ValueError, match="is damaged: mp_rank_00_model_states.pt changed since it was written"):
        init_weights(config, Transformer(config.model))


def _marker(run, step):
    return json.loads((run / "checkpoints" / tag_for(step) / MARKER).read_text())


def _first_loss(run):
    return next(m["train/loss_hex"] for m in metrics(run) if m.get("step") == 1 and "train/loss_hex" in m)


@pytest.fixture(scope="module")
def killed_fine_tune(source, long_dataset, tmp_path_factory):
    """A ZeRO-2 fine-tune killed after step 3 and resumed with its source moved away: (args, run, killed at)."""
    src, _ = source
    root = tmp_path_factory.mktemp("fine_tune")
    args = fine_tune_args(long_dataset, root, "ft", src, "deepspeed.zero_stage=2", "schedule.max_steps=6",
                          "checkpoint.every=2", "checkpoint.keep_last=5")
    kill_after_step(args, root / "ft", 3)
    done = max(int(p.name[4:]) for p in (root / "ft" / "checkpoints").glob("step*") if (p / MARKER).is_file())
    assert done < 6, "the fine-tune finished before it was killed"
    before = (root / "ft" / "train.log").read_text()
    # The source is not read again: moved away, the fine-tune still resumes, from its own checkpoint.
    moved = src.with_name("src_moved")
    src.rename(moved)
    try:
        resumed = run_pope(*args)
    finally:
        moved.rename(src)
    return args, root / "ft", done, before, resumed.stdout


def test_fine_tune_resumes_from_its_own_checkpoints(source, killed_fine_tune):
    run, _ = source
    args, ft, done, before, resumed = killed_fine_tune
    assert f"init: weights from {run} step {SOURCE_STEPS} (16 tensors)" in before
    record = _marker(ft, 2)["metadata"]["init"]
    assert record["checksum"] == state_checksum(source_weights(run))  # the model held the source bit for bit
    assert record["step"] == SOURCE_STEPS and record["path"] == str(run) and record["kind"] == "run"
    assert f"resumed from step {done}" in resumed and "init:" not in resumed
    final = _marker(ft, 6)
    assert final["metadata"]["init"] == record and final["identity"]["init"] == {"from": str(run), "step": 0}
    assert sorted({m["step"] for m in metrics(ft) if "train/loss" in m}) == list(range(1, 7))
    # A resume that asks for other weights than its checkpoints started from is refused in one line.
    refused = run_pope(*args, "init.from=elsewhere", "schedule.max_steps=8", check=False)
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"pope: error: cannot resume {ft}: its checkpoints started from {run}, the config now "
                           "has init.from=elsewhere")


def test_zero3_fine_tune_starts_from_the_source_weights(source, long_dataset, killed_fine_tune, tmp_path):
    """Loaded before ZeRO-3 partitions the model: the first step's loss is ZeRO-2's, bit for bit."""
    run, _ = source
    ft2 = killed_fine_tune[1]
    proc = run_pope(*fine_tune_args(long_dataset, tmp_path, "ft3", run, "deepspeed.zero_stage=3",
                                    "schedule.max_steps=2", "checkpoint.every=2"))
    assert f"init: weights from {run} step {SOURCE_STEPS} (16 tensors)" in proc.stdout
    assert _marker(tmp_path / "ft3", 2)["metadata"]["init"]["checksum"] == state_checksum(source_weights(run))
    assert _first_loss(tmp_path / "ft3") == _first_loss(ft2)
    # ... and it starts where the source left off, not from a random model's ln(320) = 5.77.
    assert float.fromhex(_first_loss(ft2)) < float.fromhex(_first_loss(run)) - 0.05
