"""`pope generate`: the KV cache against re-running the sequence, sampling, and each corpus's output as real files.

Cache equivalence uses random small models (what matters is that both paths compute the same function); the
corpus outputs use real tiny preps (tests/tiny_data.py) with one run trained through the CLI (JSB) and export
folders of random-initialised models for the others, all read back with symusic, mido or plain text.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import mido
import pytest
import symusic
import torch

from conftest import run_pope
from data_prep.contract import MANIFEST, TOKENIZER_DIR
from pipeline.config import Config, ModelConfig, RopeScalingConfig, to_yaml
from pipeline.generate import Sampling, filter_logits, generate, write_jsb_midi
from pipeline.model import KVCache, Transformer
from tiny_data import build

# every model.position, and RoPE with YaRN (s = 4 over the 16 trained positions)
KINDS = ["pope", "rope", "rope_half", "alibi", "alibi_half", "sinusoidal", "learned", "none", "rope_yarn"]


def small_model(position: str, max_seq_len: int = 16, vocab: int = 50) -> Transformer:
    torch.manual_seed(0)
    # init_std 0.5: with GPT-2's 0.02 a random model with tied embeddings repeats one token forever, which would
    # make greedy agreement a weak check; wide logits also keep greedy choices away from near-ties
    scaling = RopeScalingConfig(type="yarn", factor=4.0) if position == "rope_yarn" else RopeScalingConfig()
    cfg = ModelConfig(vocab_size=vocab, d_model=32, n_heads=4, n_layers=2, max_seq_len=max_seq_len,
                      position=position.removesuffix("_yarn"), pope_delta_init="uniform", init_std=0.5,
                      rope_scaling=scaling)
    return Transformer(cfg).float().eval()


@pytest.mark.parametrize("position", KINDS)
def test_cache_logits_match_full_forward(position):
    """A prompt prefill, a multi-token prefill after the cache, and single tokens give the full forward's logits
    (every encoding but learned past max_seq_len = 16, and past the cache's first capacity of 64; ALiBi's bias
    against the cached keys' absolute positions included)."""
    model = small_model(position)
    length = 16 if position == "learned" else 90
    cuts = [0, 5, 9, 10, 11, length] if position == "learned" else [0, 5, 9, 10, 11, 40, 41, 70, 71, 90]
    tokens = torch.randint(0, 50, (2, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(tokens)
        cache = KVCache(len(model.blocks))
        pieces = [model(tokens[:, a:b], cache=cache)[0] for a, b in zip(cuts, cuts[1:])]
    assert cache.length == length
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("position", KINDS)
def test_greedy_cached_equals_uncached(position):
    """Token for token in fp32; every encoding but learned goes well beyond max_seq_len (16)."""
    model = small_model(position)
    prompt = [3, 17, 4, 42, 8]
    new = 11 if position == "learned" else 60
    greedy = Sampling(temperature=0)
    cached = generate(model, prompt, new, greedy, use_cache=True)
    uncached = generate(model, prompt, new, greedy, use_cache=False)
    assert len(cached) == new
    assert cached == uncached
    assert len(set(cached)) >= 3  # a model stuck on one token would make the comparison weak


@pytest.mark.parametrize("position", ["pope", "rope", "alibi"])
def test_sampled_cached_equals_uncached(position):
    """With the same seed, sampling draws the same tokens with and without the cache (same probabilities)."""
    model = small_model(position)
    sampling = Sampling(temperature=1.0, top_k=20, top_p=0.9, seed=7)
    assert generate(model, [1, 2, 3], 30, sampling) == generate(model, [1, 2, 3], 30, sampling, use_cache=False)


def test_learned_refuses_beyond_max_seq_len():
    with pytest.raises(ValueError, match=r"max_seq_len=16.*--max-new-tokens 11 or less"):
        generate(small_model("learned"), [1, 2, 3, 4, 5], 12)


def test_seeded_sampling_is_deterministic():
    model = small_model("pope")
    runs = [generate(model, [5, 6], 40, Sampling(temperature=1.2, top_k=10, top_p=0.95, seed=s)) for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_filters_and_banned_ids():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [False, True, False, True, False]
    # probabilities ≈ .64, .24, .09, .03, .01: the nucleus of 0.8 is the two most likely tokens
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [False, True, False, True, False]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [False, True, False, False, False]
    model = small_model("rope")
    out = generate(model, [1], 50, Sampling(temperature=1.0, seed=0), banned=range(0, 45))
    assert all(t >= 45 for t in out)
    greedy = generate(model, [1], 8, Sampling(temperature=0))
    stop = greedy[3]
    assert generate(model, [1], 8, Sampling(temperature=0), stop=[stop]) == greedy[:greedy.index(stop) + 1]


# ----------------------------------------------------------------------------------------- corpora, real files


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("generate_data")


def make_export(data: Path, folder: Path, position: str = "pope") -> Path:
    """A `pope export` folder (the files pipeline/export.py writes) of a random-initialised model on `data`."""
    from safetensors.torch import save_file

    manifest = json.loads((data / MANIFEST).read_text())
    cfg = ModelConfig(vocab_size=manifest["vocab_size"], d_model=32, n_heads=2, n_layers=2, max_seq_len=64,
                      position=position)
    torch.manual_seed(0)
    model = Transformer(cfg)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    config = Config()
    config.model, config.data.path, config.data.seq_len = cfg, str(data), 64
    (folder / "config.yaml").write_text(to_yaml(config))
    if (data / TOKENIZER_DIR).is_dir():
        shutil.copytree(data / TOKENIZER_DIR, folder / TOKENIZER_DIR)
    shutil.copy2(data / MANIFEST, folder / MANIFEST)
    (folder / "model.json").write_text(json.dumps({"format": "pope-pretrain", "model": dataclasses.asdict(cfg),
                                                   "step": 0}))
    return folder


@pytest.fixture(scope="module")
def jsb_run(tiny_root, tmp_path_factory) -> Path:
    """The tiny JSB PoPE config trained for 6 steps through `pope train` (2 processes, ZeRO-2)."""
    data = build("jsb", tiny_root)
    runs = tmp_path_factory.mktemp("generate_runs")
    run_pope("train", "tiny/jsb_pope", f"data.path={data}", f"run_dir={runs}", "schedule.max_steps=6",
             "schedule.warmup_steps=2", "eval.every=6", "eval.max_batches=1", "checkpoint.every=6")
    return runs / "tiny_jsb_pope"


def voices(path: Path) -> list[list[tuple[int, int, int]]]:
    """(start, duration, pitch) of each track's notes, read with symusic."""
    score = symusic.Score(str(path))
    return [[(n.time, n.duration, n.pitch) for n in t.notes] for t in score.tracks]


def test_jsb_run_end_to_end(jsb_run, tmp_path):
    """No prompt → a .mid of four voices; cached greedy == uncached greedy through the CLI (same bytes)."""
    cached, uncached = tmp_path / "cached.mid", tmp_path / "uncached.mid"
    # 300 new tokens past a 64-token prompt: beyond the training length (max_seq_len 256)
    common = ["generate", str(jsb_run), "--temperature", "0", "--max-new-tokens", "300"]
    proc = run_pope(*common, "--out", str(cached))
    assert "91 sixteenth-note steps, 4 voices" in proc.stderr  # (64 prompt + 300 new tokens) / 4 voices
    run_pope(*common, "--out", str(uncached), "--no-cache")
    assert cached.read_bytes() == uncached.read_bytes()
    tracks = voices(cached)
    assert len(tracks) == 4 and all(tracks)
    assert all(21 <= p <= 108 and d % 120 == 0 and s % 120 == 0 for t in tracks for s, d, p in t)
    midi = mido.MidiFile(str(cached))
    assert sum(any(m.type == "note_on" for m in track) for track in midi.tracks) == 4
    assert 64 // 4 * 120 < max(s + d for t in tracks for s, d, p in t) <= 91 * 120


def test_jsb_prompts(jsb_run, tmp_path):
    """--prompt-sample and a .mid prompt: the output begins with the prompt, a held note stays one note."""
    sampled = tmp_path / "sampled.mid"
    run_pope("generate", str(jsb_run), "--prompt-sample", "1", "--prompt-length", "32", "--max-new-tokens", "16",
             "--seed", "3", "--out", str(sampled))
    assert len(voices(sampled)) == 4
    # a prompt file: two bars, the soprano holding one pitch for a whole bar (one note) then moving
    prompt = tmp_path / "prompt.mid"
    steps = [[72 if s < 16 else 74, 67, 64, 48] for s in range(32)]
    assert write_jsb_midi(steps, prompt) == 5
    out = tmp_path / "continued.mid"
    run_pope("generate", str(jsb_run), "--prompt-file", str(prompt), "--max-new-tokens", "8", "--seed", "1",
             "--out", str(out))
    soprano = voices(out)[0]
    assert soprano[0] == (0, 16 * 120, 72)
    assert soprano[1][0] == 16 * 120 and soprano[1][2] == 74
    # the export of the same run generates the same piece (same weights, seed and tokenizer)
    export = tmp_path / "export"
    run_pope("export", str(jsb_run), "--out", str(export))
    again = tmp_path / "again.mid"
    run_pope("generate", str(export), "--prompt-file", str(prompt), "--max-new-tokens", "8", "--seed", "1",
             "--out", str(again))
    assert again.read_bytes() == out.read_bytes()


def test_jsb_errors_are_one_line(jsb_run, tmp_path):
    proc = run_pope("generate", str(jsb_run), "--out", str(tmp_path / "piece.txt"), check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--out piece.mid" in proc.stderr
    proc = run_pope("generate", str(jsb_run), "--prompt", "hello", "--out", str(tmp_path / "p.mid"), check=False)
    assert proc.returncode == 2 and "MIDI file" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_text_export(tiny_root, tmp_path):
    export = make_export(build("text", tiny_root), tmp_path / "text_export")
    proc = run_pope("generate", str(export), "--prompt", "the music", "--max-new-tokens", "20", "--seed", "0")
    assert proc.stdout.startswith("the music") and "new tokens" in proc.stderr
    again = run_pope("generate", str(export), "--prompt", "the music", "--max-new-tokens", "20", "--seed", "0")
    assert again.stdout == proc.stdout
    out = tmp_path / "sample.txt"
    run_pope("generate", str(export), "--max-new-tokens", "10", "--out", str(out))
    assert out.read_text().endswith("\n")
    proc = run_pope("generate", str(export), "--out", str(tmp_path / "piece.mid"), check=False)
    assert proc.returncode == 2 and "not MIDI" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_learned_export_refuses_past_max_seq_len(tiny_root, tmp_path):
    export = make_export(build("text", tiny_root), tmp_path / "learned_export", position="learned")
    proc = run_pope("generate", str(export), "--max-new-tokens", "100", check=False)
    assert proc.returncode == 2 and "max_seq_len=64" in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_genome_fasta(tiny_root, tmp_path):
    export = make_export(build("genome", tiny_root), tmp_path / "genome_export", position="rope")
    out = tmp_path / "gen.fa"
    run_pope("generate", str(export), "--prompt", "ACGTACGTAAACCCGGGTTTN", "--max-new-tokens", "100",
             "--out", str(out))
    lines = out.read_text().splitlines()
    assert lines[0].startswith(">") and len(lines) > 2
    assert all(set(line) <= set("ACGTN") and 0 < len(line) <= 60 for line in lines[1:])
    assert all(len(line) == 60 for line in lines[1:-1])
    assert "".join(lines[1:]).startswith("ACGTACGTAAACCCGGGTTTN")
    proc = run_pope("generate", str(export), "--prompt-sample", "0", "--max-new-tokens", "10")  # to stdout
    assert proc.stdout.startswith(">") and set("".join(proc.stdout.splitlines()[1:])) <= set("ACGTN")
    proc = run_pope("generate", str(export), "--prompt", "ACGU", check=False)
    assert proc.returncode == 2 and "A, C, G, T, N" in proc.stderr


def test_remi_midi(tiny_root, tmp_path):
    from music_fixtures import write_mido

    export = make_export(build("midi", tiny_root), tmp_path / "remi_export")
    out = tmp_path / "remi.mid"
    run_pope("generate", str(export), "--max-new-tokens", "60", "--top-k", "40", "--out", str(out))
    symusic.Score(str(out))
    mido.MidiFile(str(out))
    # a MIDI prompt (two tracks, written with mido) comes back at the start of the output
    prompt = tmp_path / "prompt.mid"
    write_mido(prompt)
    continued = tmp_path / "continued.mid"
    run_pope("generate", str(export), "--prompt-file", str(prompt), "--max-new-tokens", "20", "--out",
             str(continued))
    notes = sum(t.note_num() for t in symusic.Score(str(continued)).tracks)
    assert notes >= 24  # the prompt's 2 × 12 notes, plus whatever was generated
    sampled = tmp_path / "sampled.mid"
    run_pope("generate", str(export), "--prompt-sample", "0", "--max-new-tokens", "10", "--out", str(sampled))
    assert sum(t.note_num() for t in symusic.Score(str(sampled)).tracks) > 0
