"""The dataset's tokenizer as Hugging Face files: `AutoTokenizer.from_pretrained(out)` gives the project's ids.

`write_hf_tokenizer` writes `tokenizer.json` (the `tokenizers` library) and `tokenizer_config.json`
(`PreTrainedTokenizerFast`) where `tokenizers` reproduces the project's encoder exactly, and returns a one-line note
of what the user does instead where it cannot (JSB, REMI: their inputs are not text). Per kind:

- sentencepiece (trained by `pope prep text`): a BPE model with byte fallback. SentencePiece writes a space as ▁
  inside pieces; here the pieces hold the space itself, so a literal ▁ in a text is a character the vocabulary
  lacks and falls back to its three byte pieces, which is what the project does (text.py). The merges are every
  split of a piece into two pieces, ranked by the piece's score, as SentencePiece's BPE merges by score. A model
  not trained here (unigram, a normalisation rule, a dummy prefix, user-defined pieces, no byte fallback) is not
  converted: the note says so.
- gpt2: the project's own tokenizer.json, which is already a `tokenizers` object.
- char, kmer6 (DNA): word-level vocabularies after the project's normalisation (a, c, g, t upper-cased, every
  other character N); 6-mers by one regex, `[ACGT]{6}|.`, which cuts each N-free run into 6-mers from its left
  end and leaves the last len % 6 bases single, each N its own token, the rule of dna.Kmer6Tokenizer.
- chars (indirect indexing): one token per character of the fixed vocabulary.

Special tokens: EOS ends a document (text, indirect), so HF generation stops where `pope generate` does. Text
documents follow an EOS in the packed samples, so EOS is also the `bos_token` (SentencePiece's `<s>` is never in the
data); lm-eval's HFLM takes bos_token as the prefix of an empty context, as the project's adapter takes EOS. The
specials are never matched inside a text (`split_special_tokens`): the project encodes a literal `</s>` or
`<|endoftext|>` as ordinary text. `decode` spells special tokens as the project's decode does (SentencePiece drops
its control tokens, the DNA and indirect vocabularies drop every `<...>` token, GPT-2 keeps `<|endoftext|>`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from data_prep.tokenizers.base import tokenizer_class

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

JSB_NOTE = ("JSB ids are pitches, not text, so there is no AutoTokenizer: four voices (soprano to bass) per 16th-note "
            "step, id = MIDI pitch - 19 for pitches 21..108, 1 = silence, 0 = pad; encode with "
            "data_prep.tokenizers.music.JSBTokenizer or `pope generate --prompt-file piece.mid`")


def write_hf_tokenizer(tokenizer_dir: Path, manifest: dict[str, Any], out: Path) -> str | None:
    """Write the Hugging Face tokenizer files of a prepared dataset into `out`.

    tokenizer_dir: the dataset's (or an export's) `tokenizer/` folder; manifest: its manifest.json as a dict (the
    `tokenizer` entry and `special_ids`). Returns None when `out` now holds a tokenizer that `AutoTokenizer` loads
    offline and that encodes as the project's tokenizer does, else a one-line note of what the user does instead
    (nothing is written then).
    """
    entry = manifest["tokenizer"]
    kind = entry["kind"]
    if kind == "jsb":
        return JSB_NOTE
    if kind == "remi":
        file = Path(tokenizer_dir) / entry.get("file", "remi.json")
        return (f"REMI ids come from MIDI files, not text, so there is no AutoTokenizer: load "
                f"{os.path.relpath(file, out)} with miditok (miditok.REMI(params=...)) and encode a score whose "
                f"non-drum tracks are merged into one, as data_prep.tokenizers.music.REMITokenizer.load(path).encode"
                f"(midi) does")
    tokenizer = tokenizer_class(kind).from_manifest(entry, Path(tokenizer_dir))
    special = {name: (manifest.get("special_ids") or {}).get(name, getattr(tokenizer.info, name))
               for name in ("pad", "bos", "eos")}
    if kind == "sentencepiece":
        built = _sentencepiece(tokenizer.model_proto, special)
    elif kind == "gpt2":
        built = _gpt2(tokenizer.tokenizer_json, special)
    elif kind in ("char", "kmer6"):
        built = _dna(tokenizer.info.vocab, kind)
    elif kind == "chars":
        built = _char_vocab(tokenizer.info.vocab)
    else:
        return f"tokenizer kind {kind!r} has no Hugging Face form; encode with data_prep.tokenizers"
    if isinstance(built, str):
        return built
    hf, tokens = built
    _save(hf, tokens, Path(out))
    return None


# ------------------------------------------------------------------------------------------------------ kinds


def _sentencepiece(model_proto: bytes, special: dict[str, int | None]) -> tuple[Any, dict[str, str]] | str:
    """SentencePiece BPE as a `tokenizers` BPE; a note where the model is not one `pope prep text` trains."""
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, decoders, models

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(model_proto)
    Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    norm = model.normalizer_spec
    differs = [what for what, bad in (
        ("not BPE", model.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE),
        (f"normalisation {norm.name}", norm.name != "identity" or bool(norm.precompiled_charsmap)),
        ("a dummy prefix", norm.add_dummy_prefix), ("whitespace removal", norm.remove_extra_whitespaces),
        ("spaces not escaped", not norm.escape_whitespaces), ("no byte fallback", not model.trainer_spec.byte_fallback),
        ("user-defined or unused pieces", any(p.type in (Piece.USER_DEFINED, Piece.UNUSED) for p in model.pieces)),
    ) if bad]
    # Normal pieces hold a space where SentencePiece writes ▁ (see the module docstring).
    pieces = [p.piece.replace("\u2581", " ") if p.type == Piece.NORMAL else p.piece for p in model.pieces]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        differs.append("pieces that differ only in ▁ and space")
    if differs:
        return (f"this SentencePiece model was not trained by pope prep text ({', '.join(differs)}), and the "
                f"tokenizers library does not reproduce it exactly; encode with sentencepiece and the dataset's "
                f"tokenizer/spm.model")
    normal = {i for i, p in enumerate(model.pieces) if p.type == Piece.NORMAL}
    ranked = []  # SentencePiece merges the adjacent pair whose joined piece scores highest
    for i in sorted(normal, key=lambda i: (-model.pieces[i].score, i)):
        piece = pieces[i]
        for cut in range(1, len(piece)):
            left, right = vocab.get(piece[:cut]), vocab.get(piece[cut:])
            if left in normal and right in normal:
                ranked.append((piece[:cut], piece[cut:]))
    controls = [p for p in model.pieces if p.type == Piece.CONTROL]
    unk = next(p.piece for p in model.pieces if p.type == Piece.UNKNOWN)
    hf = Tokenizer(models.BPE(vocab=vocab, merges=ranked, unk_token=unk, byte_fallback=True, fuse_unk=True))
    # SentencePiece's decode drops control tokens and spells <unk> as " ⁇ "
    hf.decoder = decoders.Sequence([
        decoders.Replace(Regex(_exactly(p.piece for p in controls)), ""),
        decoders.Replace(Regex(_exactly([unk])), " \u2047 "),
        decoders.ByteFallback(), decoders.Fuse()])
    tokens = _text_specials(lambda i: model.pieces[i].piece, special)
    tokens["unk_token"] = unk
    return hf, tokens


def _gpt2(tokenizer_json: str, special: dict[str, int | None]) -> tuple[Any, dict[str, str]]:
    from tokenizers import Tokenizer

    hf = Tokenizer.from_str(tokenizer_json)
    return hf, _text_specials(hf.id_to_token, special)


def _text_specials(spell: Any, special: dict[str, int | None]) -> dict[str, str]:
    """EOS ends a document and begins the next (text has no BOS in its samples); PAD where the data has one."""
    tokens = {"eos_token": spell(special["eos"]), "bos_token": spell(special["eos"])}
    if special["pad"] is not None:
        tokens["pad_token"] = spell(special["pad"])
    return tokens


def _dna(vocab: list[str], kind: str) -> tuple[Any, dict[str, str]]:
    """Word-level DNA tokens after dna.normalize's rule: a, c, g, t upper-cased, every other character N."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    from data_prep.tokenizers.dna import NT_BASES

    normalizer = normalizers.Sequence([normalizers.Replace(b.lower(), b) for b in NT_BASES]
                                      + [normalizers.Replace(Regex(f"[^{NT_BASES}]"), "N")])
    # 6-mers: leftmost first, a 6-mer where six bases follow, else one base or N (N-free runs cut from the left)
    unit = f"[{NT_BASES}]{{6}}|." if kind == "kmer6" else "."
    hf = _word_level(vocab, "N", pre_tokenizers.Split(Regex(unit), "isolated"), normalizer)
    return hf, {"pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>", "cls_token": "<cls>"}


def _char_vocab(vocab: list[str]) -> tuple[Any, dict[str, str]]:
    """One token per character; a character outside the vocabulary fails to encode, as in the project."""
    from tokenizers import Regex, pre_tokenizers

    # (?m) makes . match a newline too (Oniguruma); the project's CharVocabTokenizer takes any character
    hf = _word_level(vocab, None, pre_tokenizers.Split(Regex("(?m)."), "isolated"), None)
    names = {"<pad>": "pad_token", "<bos>": "bos_token", "<eos>": "eos_token"}
    return hf, {names[t]: t for t in vocab if t in names}


def _word_level(vocab: list[str], unk: str | None, pre_tokenizer: Any, normalizer: Any) -> Any:
    """A word-level tokenizer whose decode joins tokens and drops the `<...>` specials (the project's decode)."""
    from tokenizers import Regex, Tokenizer, decoders, models

    # without an unknown token in the vocabulary, an unknown character fails to encode
    hf = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token=unk or "[UNK]"))
    if normalizer is not None:
        hf.normalizer = normalizer
    hf.pre_tokenizer = pre_tokenizer
    specials = [t for t in vocab if t.startswith("<")]
    hf.decoder = decoders.Sequence([decoders.Replace(Regex(_exactly(specials)), ""), decoders.Fuse()])
    return hf


def _exactly(tokens: Any) -> str:
    """A regex matching a whole token that is one of `tokens` (\\A, \\z: ^ and $ would match at newlines)."""
    return r"\A(?:" + "|".join(re.escape(t) for t in tokens) + r")\z"


# ------------------------------------------------------------------------------------------------------- files


def _save(hf: Any, tokens: dict[str, str], out: Path) -> None:
    """tokenizer.json with the specials registered, and the config that names them for PreTrainedTokenizerFast."""
    from tokenizers import AddedToken

    out.mkdir(parents=True, exist_ok=True)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(tokens.values())])
    hf.save(str(out / TOKENIZER_JSON))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens,
              # the project encodes a special token's spelling inside a text as ordinary text
              "split_special_tokens": True,
              # decode gives the text back as it was: no tidying of spaces before punctuation
              "clean_up_tokenization_spaces": False}
    (out / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
