"""`pope eval length`, `pope eval val --data` and PoPE's δ in TensorBoard, on tiny runs trained here.

One PoPE run (2 processes, ZeRO-3, so δ is partitioned and must be gathered for its figures) and one run with
learned absolute positions are trained on the session's text dataset (samples of 33 tokens); a second prep of
the same documents at --seq-len 96 with the run's own SentencePiece model gives windows longer than the training
length, and a third with a tokenizer trained anew gives a mismatch. The protocol is checked against the model's
ordinary forward pass computed in the test.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_pope, tiny_train_args

pytestmark = pytest.mark.slow

LENGTHS = (16, 32, 64)  # 64 is beyond the run's model.max_seq_len and data.seq_len (32)


@pytest.fixture(scope="module")
def long_dataset(text_dataset: Path, tmp_path_factory) -> Path:
    """The session dataset's documents prepared again at --seq-len 96 with the same SentencePiece model."""
    from data_prep.parallel import PrepOptions
    from data_prep.text import prep_text

    out = tmp_path_factory.mktemp("long") / "text-96"
    prep_text([text_dataset.parent / "docs.jsonl"], out, tokenizer_model=text_dataset / "tokenizer" / "spm.model",
              val_fraction=0.1, seq_len=96, options=PrepOptions(workers=1, progress=False))
    return out


@pytest.fixture(scope="module")
def other_tokenizer(text_dataset: Path, tmp_path_factory) -> Path:
    """The same documents with a SentencePiece model trained anew at another vocabulary size."""
    from data_prep.parallel import PrepOptions
    from data_prep.text import prep_text

    out = tmp_path_factory.mktemp("other") / "text-other"
    prep_text([text_dataset.parent / "docs.jsonl"], out, vocab_size=360, val_fraction=0.1, seq_len=96,
              options=PrepOptions(workers=1, progress=False))
    return out


@pytest.fixture(scope="module")
def runs(text_dataset: Path, tmp_path_factory) -> dict[str, Path]:
    """A PoPE run (ZeRO-3, 2 processes, evaluated at steps 5 and 10), a learned-positions run and a RoPE run (1
    process each)."""
    root = tmp_path_factory.mktemp("runs")
    run_pope(*tiny_train_args(text_dataset, root, "pope", "schedule.max_steps=10", "checkpoint.every=10",
                              "eval.every=5", "deepspeed.zero_stage=3"))
    short = ("launch.nproc=1", "schedule.max_steps=2", "schedule.warmup_steps=1", "checkpoint.every=2", "eval.every=0")
    run_pope(*tiny_train_args(text_dataset, root, "learned", "model.position=learned", *short))
    run_pope(*tiny_train_args(text_dataset, root, "rope", "model.position=rope", *short))
    return {"pope": root / "pope", "learned": root / "learned", "rope": root / "rope"}


@pytest.fixture(scope="module")
def length_eval(runs: dict[str, Path], long_dataset: Path, tmp_path_factory) -> Path:
    """`pope eval length` over the PoPE run and its export folder, 3 samples per length, bands of 16."""
    export = tmp_path_factory.mktemp("export") / "pope_export"
    run_pope("export", str(runs["pope"]), "--out", str(export))
    out = tmp_path_factory.mktemp("length_eval")
    proc = run_pope("eval", "length", str(runs["pope"]), str(export), "--data", str(long_dataset), "--lengths",
                    ",".join(map(str, LENGTHS)), "--max-samples", "3", "--band", "16", "--out", str(out))
    assert "L=64" in proc.stdout
    return out


def _direct(run: Path, data: Path, length: int, max_samples: int, **scaling) -> tuple[int, np.ndarray]:
    """The protocol written out with the model's ordinary forward: (samples, summed NLL per position); `scaling`:
    model.rope_scaling keys to build the model with."""
    import dataclasses

    from data_prep.mds import read_split
    from pipeline.export import build_model
    from pipeline.run import load_run

    config, state, _ = load_run(run)
    model_config = config.model
    if scaling:
        model_config = dataclasses.replace(model_config,
                                           rope_scaling=dataclasses.replace(model_config.rope_scaling, **scaling))
    model = build_model(model_config, state).eval()
    windows = [np.asarray(s[: length + 1], dtype=np.int64) for s in read_split(data / "val") if len(s) >= length + 1]
    windows = windows[:max_samples]
    tokens = torch.from_numpy(np.stack(windows))
    with torch.no_grad():
        logits, mean = model(tokens[:, :-1], tokens[:, 1:])
    per_token = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none").double()
    assert math.isclose(float(per_token.mean()), float(mean), rel_tol=1e-5)
    return len(windows), per_token.sum(dim=0).numpy()


def test_protocol_matches_the_forward_pass(runs, long_dataset, length_eval):
    from pipeline.length_eval import read_csv

    rows = read_csv(length_eval / "length.csv")
    assert {r["run"] for r in rows} == {"pope", "pope_export"}
    bands = read_csv(length_eval / "positions.csv")
    for length in LENGTHS:
        samples, sums = _direct(runs["pope"], long_dataset, length, 3)
        nll = sums.sum() / (samples * length)
        for row in (r for r in rows if int(r["L"]) == length):  # the run and its export agree with it
            assert row["position"] == "pope" and int(row["step"]) == 10
            assert int(row["samples"]) == samples == 3 and int(row["tokens"]) == 3 * length
            assert float(row["nll"]) == pytest.approx(nll, abs=2e-6)
            assert float(row["ppl"]) == pytest.approx(math.exp(nll), rel=1e-4)
        mine = [b for b in bands if b["run"] == "pope" and int(b["L"]) == length]
        assert [(int(b["pos_start"]), int(b["pos_end"])) for b in mine] == [(s, s + 16) for s in range(0, length, 16)]
        for band in mine:
            start, end = int(band["pos_start"]), int(band["pos_end"])
            assert int(band["tokens"]) == 3 * (end - start)
            assert float(band["nll"]) == pytest.approx(sums[start:end].sum() / (3 * (end - start)), abs=2e-6)
    header = (length_eval / "length.csv").read_text().splitlines()[1]
    assert header.startswith("# protocol: for each length L, every sample of the split that holds at least L+1")


def test_csvs_pngs_and_tensorboard_written(runs, length_eval):
    import matplotlib.image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for name in ("ppl_vs_length.png", "nll_per_position.png"):
        path = length_eval / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0  # drawn, not blank
    events = EventAccumulator(str(runs["pope"] / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"length_eval/ppl_vs_length", "length_eval/nll_per_position"} <= set(tags["images"])
    assert {f"length_eval/ppl_L{L}" for L in LENGTHS} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("length_eval/nll_L64")] == [10]


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pope: error: "), proc.stderr
    return lines[0]


def test_tokenizer_mismatch_is_refused(runs, other_tokenizer, long_dataset, tmp_path):
    line = _one_line_error(run_pope("eval", "length", str(runs["pope"]), "--data", str(other_tokenizer),
                                    "--lengths", "16", "--out", str(tmp_path), check=False))
    assert "was not prepared with the tokenizer of pope" in line and "spm.model sha256" in line
    line = _one_line_error(run_pope("eval", "val", str(runs["pope"]), "--data", str(other_tokenizer), check=False))
    assert "was not prepared with the tokenizer of pope" in line
    proc = run_pope("eval", "val", str(runs["pope"]), "--data", str(long_dataset))  # same tokenizer: evaluates
    assert "val loss" in proc.stdout


def test_no_sample_long_enough_names_the_prep(runs, long_dataset, tmp_path):
    line = _one_line_error(run_pope("eval", "length", str(runs["pope"]), "--data", str(long_dataset),
                                    "--lengths", "16,500", "--out", str(tmp_path), check=False))
    assert "holds no sample of L+1=501 tokens" in line
    assert "pope prep text --input" in line and "--seq-len 500" in line
    assert f"--tokenizer-model {long_dataset / 'tokenizer' / 'spm.model'}" in line


def test_learned_positions_refuse_longer_lengths(runs, long_dataset, tmp_path):
    line = _one_line_error(run_pope("eval", "length", str(runs["learned"]), "--data", str(long_dataset),
                                    "--lengths", "16,64", "--out", str(tmp_path), check=False))
    assert "learned absolute positions" in line and "L=64" in line and "16" not in line.split("L=")[1]
    proc = run_pope("eval", "length", str(runs["learned"]), "--data", str(long_dataset), "--lengths", "16,32",
                    "--max-samples", "2", "--out", str(tmp_path))
    assert "L=32" in proc.stdout


def test_yarn_at_evaluation_time(runs, long_dataset, tmp_path):
    """`pope eval length RUN model.rope_scaling...=`: the RoPE run with YaRN is its own labelled row, scored by the
    YaRN model; the plain evaluation of the same run differs; overrides that change weights, or YaRN on PoPE, are
    refused in one line."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pipeline.length_eval import read_csv

    yarn = ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4"]
    common = ["--data", str(long_dataset), "--lengths", "16,64", "--max-samples", "2"]
    proc = run_pope("eval", "length", str(runs["rope"]), *common, "--out", str(tmp_path / "yarn"), *yarn)
    assert "rope+yarn4 (rope, yarn(s=4,L=32,a=1,b=32), step 2): L=64" in proc.stdout
    run_pope("eval", "length", str(runs["rope"]), *common, "--out", str(tmp_path / "plain"))
    scaled, plain = read_csv(tmp_path / "yarn" / "length.csv"), read_csv(tmp_path / "plain" / "length.csv")
    assert [(r["run"], r["scaling"]) for r in scaled] == [("rope+yarn4", "yarn(s=4,L=32,a=1,b=32)")] * 2
    assert [(r["run"], r["scaling"]) for r in plain] == [("rope", "none")] * 2
    for row in scaled:
        length = int(row["L"])
        samples, sums = _direct(runs["rope"], long_dataset, length, 2, type="yarn", factor=4.0)
        assert float(row["nll"]) == pytest.approx(sums.sum() / (samples * length), abs=2e-6)
    # (2 steps of training leave attention nearly uniform, so YaRN moves this run's NLL by ~1e-6 only: check
    # that the override reached every layer instead)
    from pipeline.length_eval import load_eval_model
    from pipeline.positional import Yarn

    entry = load_eval_model(runs["rope"], yarn)
    assert entry.variant == "+yarn4" and entry.tag == "length_eval_yarn4"
    assert all(block.attn.position.yarn == Yarn(4.0, 32, 1.0, 32.0) for block in entry.model.blocks)
    assert all(block.attn.position.yarn is None for block in load_eval_model(runs["rope"]).model.blocks)
    events = EventAccumulator(str(runs["rope"] / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    assert {"length_eval/ppl_L64", "length_eval_yarn4/ppl_L64"} <= set(events.Tags()["scalars"])

    line = _one_line_error(run_pope("eval", "length", str(runs["pope"]), *common, "--out", str(tmp_path), *yarn,
                                    check=False))
    assert "yarn scales RoPE frequencies; model.position=pope has none" in line
    line = _one_line_error(run_pope("eval", "length", str(runs["rope"]), *common, "--out", str(tmp_path),
                                    "model.n_heads=4", check=False))
    assert "only model.rope_scaling.* and model.position_base can change" in line


def test_delta_heatmaps_and_histograms_in_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs["pope"] / "tb"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    layers = {"delta/layer_00", "delta/layer_01"}  # model.n_layers=2
    assert layers <= set(tags["images"]) and layers <= set(tags["histograms"])
    assert [e.step for e in events.Images("delta/layer_01")] == [5, 10]
    histogram = events.Histograms("delta/layer_00")[-1].histogram_value
    assert histogram.num == 2 * 16  # heads × head_dim frequencies, gathered whole under ZeRO-3
    assert -2 * math.pi - 1e-6 <= histogram.min <= histogram.max <= 0.0
    learned = EventAccumulator(str(runs["learned"] / "tb"), size_guidance={"images": 0})
    learned.Reload()
    assert not any(t.startswith("delta/") for t in learned.Tags()["images"])


def test_hidden_states_project_to_the_forward_logits():
    from pipeline.config import ModelConfig
    from pipeline.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_heads=2, n_layers=2, max_seq_len=16)).eval()
    tokens = torch.randint(0, 50, (2, 40))  # beyond max_seq_len
    with torch.no_grad():
        logits, _ = model(tokens)
        projected = F.linear(model.hidden(tokens), model.embed.weight)
    torch.testing.assert_close(projected, logits, rtol=0, atol=0)
