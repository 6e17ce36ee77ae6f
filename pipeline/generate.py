"""`pope generate`: sample a continuation from a trained run (or an export) and write it the corpus's way.

- Decoding: one sequence, fp32, a KV cache (pipeline/model.py: each step encodes only the new token and attends to
  the cached keys and values); `use_cache=False` re-runs the whole sequence every step (the reference the tests
  compare with, and the benchmark's baseline). Temperature 0 is greedy; otherwise top-k, then top-p (nucleus)
  filtering, then a draw from a torch.Generator seeded with `seed`, so a seed gives the same output every time.
- Ids a sample never holds at that point are never drawn: PAD everywhere, BOS after the start, the unused DNA
  specials, REMI's MASK. Where documents end with EOS (text, REMI, indirect), generation stops at EOS.
- Prompts and output through the data's own tokenizer, by corpus:
    text, indirect  --prompt TEXT / --prompt-file F → text on stdout or in --out FILE
    jsb             --prompt-file piece.mid (quantised to 16ths, four voices) → a .mid of four tracks
    midi (REMI)     --prompt-file piece.mid (encoded by the saved miditok tokenizer) → a .mid through miditok
    genome          --prompt ACGT... / --prompt-file F (FASTA or bare bases) → FASTA on stdout or in --out FILE
  `--prompt-sample i` takes the first `prompt_length` tokens of sample i of the test split (val where there is
  none). Without a prompt, generation starts as the corpus's samples start: BOS where samples begin with one (REMI,
  indirect), EOS for text (each document follows one), else the opening tokens of the first test sample (JSB,
  genome). The output holds the prompt (without BOS/EOS) followed by the new tokens.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from data_prep.contract import MANIFEST, TOKENIZER_DIR, read_manifest
from data_prep.tokenizers import Tokenizer, load_tokenizer
from data_prep.tokenizers.base import tokenizer_class
from pipeline.config import ModelConfig
from pipeline.model import KVCache, Transformer

MIDI_SUFFIXES = (".mid", ".midi")
FASTA_SUFFIXES = (".fa", ".fasta", ".fna")
FASTA_WIDTH = 60  # bases per FASTA line
JSB_TPQ = 480  # ticks per quarter of the MIDI files written here
JSB_STEP_TICKS = JSB_TPQ // 4  # one 16th note
JSB_QPM = 80.0  # a chorale tempo
JSB_VOICE_NAMES = ("Soprano", "Alto", "Tenor", "Bass")
JSB_VELOCITY = 80
ENDS_WITH_EOS = ("text", "indirect", "midi")  # corpora whose documents (pieces) end with EOS: generation stops there
DEFAULT_PROMPT_LENGTH = 64  # tokens of a sample used as a prompt: JSB 16 steps (one 4/4 bar), 64 k-mers of DNA


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def check(self) -> None:
        """One-line ValueErrors for settings that mean nothing."""
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0 (0 is greedy); got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0 keeps every token); got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1] (1 keeps every token); got {self.top_p}")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (vocab,) with every token outside the top k, then outside the nucleus of mass top_p, set to -inf.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (the most likely token
    is always kept)."""
    logits = logits.clone()
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass of the more likely tokens
        drop = before >= top_p
        drop[0] = False
        logits[order[drop]] = float("-inf")
    return logits


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from fp32 logits (vocab,): argmax at temperature 0, else a filtered, seeded draw."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    filtered = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    probs = torch.softmax(filtered, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def check_length(config: ModelConfig, prompt_tokens: int, max_new_tokens: int) -> None:
    """Learned absolute positions have no row beyond max_seq_len: refuse before generating, in one line."""
    total = prompt_tokens + max_new_tokens
    if config.position == "learned" and total > config.max_seq_len:
        room = config.max_seq_len - prompt_tokens
        raise ValueError(f"a model with learned positions reads at most model.max_seq_len={config.max_seq_len} "
                         f"tokens; the prompt ({prompt_tokens}) plus --max-new-tokens {max_new_tokens} is {total}"
                         + (f": use --max-new-tokens {room} or less" if room > 0 else ": shorten the prompt"))


@torch.no_grad()
def generate(model: Transformer, prompt: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(), *,
             use_cache: bool = True, banned: Sequence[int] = (), stop: Sequence[int] = (),
             done: Callable[[list[int]], bool] | None = None) -> list[int]:
    """The new tokens (not the prompt) after `prompt`, up to max_new_tokens; stops early after a `stop` id, or
    once `done(new tokens so far)` is true (the harness's stop strings, pipeline/harness.py).

    With use_cache the prompt is read once into a KVCache and each step feeds only the last token; without it each
    step runs the whole sequence (the same logits up to float rounding, so greedy decoding agrees token for token).
    `banned` ids get probability 0. The model is used as it is (put it in eval mode, fp32, on its device).
    """
    if not len(prompt):
        raise ValueError("the prompt is empty: generation needs at least one token to start from")
    if max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0; got {max_new_tokens}")
    sampling.check()
    check_length(model.cfg, len(prompt), max_new_tokens)
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(sampling.seed)  # draws on the CPU: same on every device
    banned_ids = torch.tensor(sorted(set(banned)), dtype=torch.long)
    stop_ids = set(stop)
    sequence = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    cache = KVCache(len(model.blocks)) if use_cache else None
    feed = sequence
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = model(feed, cache=cache) if cache is not None else model(sequence)
        last = logits[0, -1].float().cpu()
        if len(banned_ids):
            last[banned_ids] = float("-inf")
        token = choose(last, sampling, generator)
        new.append(token)
        if token in stop_ids or (done is not None and done(new)):
            break
        feed = torch.tensor([[token]], dtype=torch.long, device=device)
        if cache is None:
            sequence = torch.cat([sequence, feed], dim=1)
    return new


# ------------------------------------------------------------------------------------------- runs and exports


@dataclasses.dataclass
class Source:
    """A model ready to generate, with what is needed to encode prompts and write its output."""

    model: Transformer
    tokenizer: Tokenizer
    manifest: dict[str, Any]
    data_path: Path | None  # the prep folder (for --prompt-sample); None when unknown
    label: str  # the run or export, for headers

    @property
    def corpus(self) -> str:
        return str(self.manifest["corpus"])


def load_source(path: str | Path, device: torch.device | None = None, overrides: Sequence[str] = ()) -> Source:
    """A run folder (its newest intact checkpoint) or a `pope export` folder → model (fp32, eval) and tokenizer;
    `overrides` (model.rope_scaling.*, model.position_base) change the model's config, not its weights."""
    from pipeline.config import apply_model_overrides
    from pipeline.export import build_model, is_export, load_exported
    from pipeline.run import RunFolder, load_run

    path = Path(path)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if is_export(path):
        model = load_exported(path, overrides)
        manifest_file = path / MANIFEST
        if not manifest_file.is_file():
            raise ValueError(f"{path} has no {MANIFEST}: export it again with this version of `pope export`")
        manifest = json.loads(manifest_file.read_text())
        entry = manifest["tokenizer"]
        # An export holds the tokenizer and manifest but no DONE marker, so load_tokenizer would refuse it.
        tokenizer = tokenizer_class(entry["kind"]).from_manifest(entry, path / TOKENIZER_DIR)
        data = _data_path_of_export(path)
        info = json.loads((path / "model.json").read_text())
        label = f"{path} (step {info.get('step')})"
    elif RunFolder(path).is_run():
        config, state, step = load_run(path)
        model = build_model(apply_model_overrides(config.model, overrides), state).eval()
        data = config.data.path
        manifest = read_manifest(data)
        tokenizer = load_tokenizer(data)
        label = f"{path} (step {step})"
    else:
        raise ValueError(f"{path} is neither a run folder (config.yaml, checkpoints/) nor a `pope export` folder "
                         "(model.json, model.safetensors)")
    if overrides:
        label += " with " + " ".join(overrides)
    data_path = Path(data) if data and Path(data).is_dir() else None
    return Source(model.float().to(device), tokenizer, manifest, data_path, label)


def _data_path_of_export(folder: Path) -> str:
    """data.path of the run an export came from, read from its config.yaml ("" when unknown): only --prompt-sample
    needs it, so a config this version would not validate is no reason to refuse the export."""
    import yaml

    try:
        data = (yaml.safe_load((folder / "config.yaml").read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return ""
    return str(data.get("path") or "")


# -------------------------------------------------------------------------------------------------- corpora


def special_ids(source: Source) -> dict[str, int | None]:
    ids = source.manifest.get("special_ids") or {}
    info = source.tokenizer.info
    return {name: ids.get(name, getattr(info, name, None)) for name in ("pad", "bos", "eos")}


def banned_ids(source: Source) -> list[int]:
    """Ids never drawn: PAD, BOS (samples hold it only at their start), and per corpus the ids that never follow
    anything in the data (the DNA tokenizers' unused specials, REMI's MASK)."""
    special = special_ids(source)
    banned = {i for i in (special["pad"], special["bos"]) if i is not None}
    if source.corpus == "genome":
        from data_prep.tokenizers.dna import SPECIALS

        banned |= set(range(len(SPECIALS)))
    if source.corpus == "midi":
        banned.add(int(source.tokenizer.remi["MASK_None"]))
    return sorted(banned)


def stop_ids(source: Source) -> list[int]:
    """EOS ends a document (text, indirect) or a piece (REMI); the other corpora have no end token."""
    eos = special_ids(source)["eos"]
    return [eos] if eos is not None and source.corpus in ENDS_WITH_EOS else []


def check_out(corpus: str, out: str | None) -> None:
    """Refuse, before any work, an output path that does not fit what the corpus produces."""
    suffix = Path(out).suffix.lower() if out else ""
    if corpus in ("jsb", "midi"):
        if out is None or suffix not in MIDI_SUFFIXES:
            raise ValueError(f"a {corpus} model writes MIDI: give --out piece.mid" + (f" (not {out})" if out else ""))
    elif suffix in MIDI_SUFFIXES:
        raise ValueError(f"a {corpus} model writes {'FASTA' if corpus == 'genome' else 'text'}, not MIDI: "
                         f"drop --out {out} or give a {'.fa' if corpus == 'genome' else '.txt'} file")
    elif corpus != "genome" and suffix in FASTA_SUFFIXES:
        raise ValueError(f"a {corpus} model writes text, not FASTA: give another --out than {out}")


def split_sample(data_path: Path | None, index: int) -> np.ndarray:
    """Sample `index` of the test split (val where there is no test split), in file order."""
    from data_prep.mds import TOKENS_COLUMN, import_streaming

    if data_path is None:
        raise ValueError("--prompt-sample needs the model's dataset, which is not on this machine (its data.path)")
    split = next((s for s in ("test", "val") if (data_path / s / "index.json").is_file()), None)
    if split is None:
        raise ValueError(f"{data_path} has neither a test nor a val split to take a prompt from")
    dataset = import_streaming().LocalDataset(local=str(data_path / split))
    if not 0 <= index < len(dataset):
        raise ValueError(f"--prompt-sample {index}: the {split} split of {data_path} has samples 0..{len(dataset) - 1}")
    return np.asarray(dataset[index][TOKENS_COLUMN], dtype=np.int64)


def sample_prompt(source: Source, index: int, length: int) -> list[int]:
    """The first `length` tokens of a test (or val) sample, padding removed; JSB cut to whole time steps."""
    if length < 1:
        raise ValueError(f"--prompt-length must be >= 1; got {length}")
    tokens = split_sample(source.data_path, index)
    pad = special_ids(source)["pad"]
    if pad is not None:
        tokens = tokens[tokens != pad]
    if source.corpus == "jsb":
        length = max(4, length // 4 * 4)
    return tokens[:length].tolist()


def jsb_steps_from_midi(path: Path) -> list[list[int]]:
    """A MIDI file → 16th-note time steps of four pitches (−1 silence), as the music21 chorale prep quantises:
    one track a voice in order (soprano first), a chord in a track keeps its top note."""
    import symusic

    from data_prep.music21_chorales import quantise

    try:
        score = symusic.Score(str(path)).to("quarter")
    except Exception as err:  # noqa: BLE001 - whatever symusic raises for a bad file, the user's file is the cause
        raise ValueError(f"cannot read the MIDI prompt {path}: {err}") from None
    tracks = [t for t in score.tracks if not t.is_drum and t.note_num()]
    if not tracks or len(tracks) > 4:
        raise ValueError(f"a JSB prompt needs 1 to 4 tracks with notes, one a voice from soprano to bass; {path} "
                         f"has {len(tracks)}")
    parts = []
    for track in tracks:
        # lowest first, so where notes overlap the top note is written last and stays (quantise overwrites)
        notes = sorted(((n.time, n.duration, n.pitch) for n in track.notes), key=lambda n: (n[0], n[2]))
        parts.append([(float(t), float(d), int(p)) for t, d, p in notes])
    parts += [[] for _ in range(4 - len(parts))]
    steps = quantise(parts)
    if not steps:
        raise ValueError(f"the MIDI prompt {path} has no note on the 16th-note grid")
    return steps


def read_bases(path: Path) -> str:
    """The bases of a FASTA (every record, headers dropped) or of a plain file of bases."""
    lines = Path(path).read_text().splitlines()
    return "".join(line.strip() for line in lines if not line.startswith((">", ";")))


def encode_prompt(source: Source, text: str | None, file: str | None) -> list[int]:
    """A user prompt (--prompt TEXT or --prompt-file F) → ids the way samples hold them."""
    corpus, tokenizer = source.corpus, source.tokenizer
    special = special_ids(source)
    if corpus in ("jsb", "midi"):
        if text is not None or file is None or Path(file).suffix.lower() not in MIDI_SUFFIXES:
            raise ValueError(f"a {corpus} prompt is a MIDI file: --prompt-file piece.mid")
        if not Path(file).is_file():
            raise ValueError(f"the MIDI prompt {file} does not exist")
        if corpus == "jsb":
            return tokenizer.encode(jsb_steps_from_midi(Path(file))).tolist()
        try:
            ids = tokenizer.encode(file).tolist()
        except Exception as err:  # noqa: BLE001 - symusic/miditok on a bad file
            raise ValueError(f"cannot encode the MIDI prompt {file}: {err}") from None
        return [special["bos"]] + ids
    if file is not None:
        content = read_bases(Path(file)) if corpus == "genome" else Path(file).read_text()
    else:
        content = text
    if corpus == "genome":
        from data_prep.tokenizers.dna import count_non_acgtn

        content = "".join(content.split())
        bad = count_non_acgtn(content)
        if bad or not content:
            raise ValueError("a genome prompt is a sequence of bases A, C, G, T, N"
                             + (f"; it holds {bad} other characters" if bad else ""))
        return tokenizer.encode(content).tolist()
    lead = [special["bos"]] if corpus == "indirect" and special["bos"] is not None else (
        [special["eos"]] if special["eos"] is not None else [])
    return lead + tokenizer.encode(content).tolist()


def default_prompt(source: Source, length: int) -> list[int]:
    """How the corpus's samples start: BOS (REMI, indirect), EOS before a text document, else the opening tokens
    of the first test (or val) sample (JSB, genome)."""
    special = special_ids(source)
    if source.corpus in ("midi", "indirect") and special["bos"] is not None:
        return [special["bos"]]
    if source.corpus == "text" and special["eos"] is not None:
        return [special["eos"]]
    return sample_prompt(source, 0, length)


def write_jsb_midi(steps: Sequence[Sequence[int]], path: Path) -> int:
    """Four voices on the 16th-note grid → a MIDI file of four tracks (soprano..bass), held notes merged: a pitch
    repeated by a voice on consecutive steps is one note; −1 is a rest. Returns the number of notes written."""
    from symusic import Note, Score, Tempo, TimeSignature, Track

    score = Score(JSB_TPQ)
    score.time_signatures.append(TimeSignature(0, 4, 4))
    score.tempos.append(Tempo(0, JSB_QPM))
    grid = np.asarray(steps, dtype=np.int64).reshape(-1, 4)
    written = 0
    for voice, name in enumerate(JSB_VOICE_NAMES):
        track = Track(name=name, program=0)  # piano: the JSB pitch set is the piano's keys
        line = grid[:, voice]
        start = 0
        for step in range(1, len(line) + 1):
            if step == len(line) or line[step] != line[start]:
                if line[start] >= 0:
                    track.notes.append(Note(start * JSB_STEP_TICKS, (step - start) * JSB_STEP_TICKS,
                                            int(line[start]), JSB_VELOCITY))
                    written += 1
                start = step
        score.tracks.append(track)
    score.dump_midi(str(path))
    return written


def write_output(source: Source, ids: Sequence[int], out: str | None, seed: int) -> str:
    """Decode ids and write them the corpus's way; returns a short description of what was written."""
    corpus, tokenizer = source.corpus, source.tokenizer
    special = special_ids(source)
    framing = {i for i in (special["bos"], special["eos"], special["pad"]) if i is not None}
    if corpus == "jsb":
        ids = list(ids)[:len(ids) // 4 * 4]  # whole time steps
        steps = tokenizer.decode(ids)
        notes = write_jsb_midi(steps, Path(out))
        return f"{out}: {len(steps)} sixteenth-note steps, 4 voices, {notes} notes"
    if corpus == "midi":
        score = tokenizer.decode([i for i in ids if i not in framing])
        score.dump_midi(str(out))
        return f"{out}: {score.note_num()} notes"
    if corpus == "genome":
        bases = tokenizer.decode(ids)
        header = f">generated by pope generate from {source.label}, seed {seed}, {len(bases)} bases"
        body = "\n".join(bases[i:i + FASTA_WIDTH] for i in range(0, len(bases), FASTA_WIDTH))
        text = f"{header}\n{body}\n"
    else:
        text = tokenizer.decode([i for i in ids if i not in framing])
        if not text.endswith("\n"):
            text += "\n"
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
        return "stdout"
    Path(out).write_text(text)
    return str(out)


def run_generate(path: str, *, prompt: str | None = None, prompt_file: str | None = None,
                 prompt_sample: int | None = None, prompt_length: int = DEFAULT_PROMPT_LENGTH,
                 max_new_tokens: int = 256, sampling: Sampling = Sampling(), out: str | None = None,
                 use_cache: bool = True, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """`pope generate`: load, build the prompt, generate, write. Returns counts and timing for the CLI to print."""
    sampling.check()
    if sum(x is not None for x in (prompt, prompt_file, prompt_sample)) > 1:
        raise ValueError("give at most one of --prompt, --prompt-file, --prompt-sample")
    if prompt_file is not None and not Path(prompt_file).is_file():
        raise ValueError(f"the prompt file {prompt_file} does not exist")
    source = load_source(path, overrides=overrides)
    check_out(source.corpus, out)
    if prompt_sample is not None:
        ids = sample_prompt(source, prompt_sample, prompt_length)
    elif prompt is not None or prompt_file is not None:
        ids = encode_prompt(source, prompt, prompt_file)
    else:
        ids = default_prompt(source, prompt_length)
    check_length(source.model.cfg, len(ids), max_new_tokens)
    start = time.perf_counter()
    new = generate(source.model, ids, max_new_tokens, sampling, use_cache=use_cache, banned=banned_ids(source),
                   stop=stop_ids(source))
    seconds = time.perf_counter() - start
    written = write_output(source, ids + new, out, sampling.seed)
    return {"prompt_tokens": len(ids), "new_tokens": len(new), "seconds": seconds, "written": written,
            "source": source.label}
