"""SentencePiece as trained by `pope prep text` gives back every text exactly, a literal U+2581 (▁) included."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from data_prep.mds import read_split
from data_prep.parallel import PrepOptions
from data_prep.text import prep_text
from data_prep.tokenizers import load_tokenizer
from data_prep.tokenizers.text import SentencePieceTokenizer

TRAINING = [f"line {i}: the quick brown fox jumps over the lazy dog, naïve café 東京 {i * 37}" for i in range(300)]
SPACE = "\u2581"  # ▁, SentencePiece's own stand-in for a space


@pytest.fixture(scope="module")
def spm() -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train(TRAINING, 320, seed=1, threads=1)


@pytest.mark.parametrize("text", [
    SPACE, SPACE * 3, f"{SPACE}start", f"end{SPACE}", f"mid{SPACE}dle", f"a {SPACE} b", f" {SPACE}", f"{SPACE} ",
    f"{SPACE}{SPACE} the {SPACE}quick{SPACE}{SPACE}", f"\n{SPACE}\n", f"東京{SPACE}café", "", "plain text",
])
def test_a_literal_u2581_round_trips(spm, text):
    assert spm.decode(spm.encode(text)) == text
    assert spm.decode(spm.encode_batch([text, "x " + text, text + " y"])[1]) == "x " + text


def test_seeded_fuzz_over_unicode_round_trips(spm):
    rng = random.Random(1234)
    tricky = " \t\r\n\0\x0b\x0c\x85\u00a0\u1680\u2028\u2029\u200b\u3000\ufeff\u0301\u2581" \
             "<s></s><unk><pad><0xE2>\\"

    def char() -> str:
        roll = rng.random()
        if roll < 0.35:
            return rng.choice(tricky)
        if roll < 0.6:
            return chr(rng.randrange(0x80))
        while True:  # any code point but a surrogate (which a valid str cannot hold alone)
            code = rng.randrange(0x110000)
            if not 0xD800 <= code < 0xE000:
                return chr(code)

    texts = ["".join(char() for _ in range(rng.randrange(0, 80))) for _ in range(2000)]
    texts += ["\r\n".join(TRAINING[:3]), "😀👍🏽 e\u0301 " * 5]
    bad = [t for t, ids in zip(texts, spm.encode_batch(texts)) if spm.decode(ids) != t]
    assert bad == []


def test_texts_without_u2581_are_encoded_exactly_as_sentencepiece_does(spm):
    texts = TRAINING[:50] + ["a\tb\r\n", "  two  spaces  "]
    assert spm.encode_batch(texts) == spm.processor.encode(texts)


def test_a_document_with_u2581_comes_back_from_a_prep(tmp_path):
    docs = TRAINING[:100] + [f"{SPACE}bullet{SPACE} points {SPACE}{SPACE}", f"a {SPACE} b"]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    out = tmp_path / "out"
    prep_text([tmp_path / "d.jsonl"], out, vocab_size=320, val_fraction=0.0, seq_len=64,
              options=PrepOptions(workers=1, progress=False))
    tokenizer = load_tokenizer(out)
    stream = np.concatenate([s.astype(np.int64) for s in read_split(out / "train")])
    cuts = np.flatnonzero(stream == tokenizer.info.eos)
    assert [tokenizer.decode(p[:-1]) for p in np.split(stream, cuts + 1)[:-1]] == docs
