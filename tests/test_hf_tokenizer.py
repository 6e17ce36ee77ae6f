"""The Hugging Face tokenizer of an export gives the project's ids: `AutoTokenizer` in a fresh process, without
the project importable, on real documents (Python's own documentation and source) and on edge cases."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from data_prep.contract import TOKENIZER_DIR
from data_prep.indirect import VOCAB as INDIRECT_VOCAB
from data_prep.tokenizers.dna import CharTokenizer, Kmer6Tokenizer
from data_prep.tokenizers.hf import JSB_NOTE, write_hf_tokenizer
from data_prep.tokenizers.music import JSBTokenizer
from data_prep.tokenizers.text import CharVocabTokenizer, GPT2Tokenizer, SentencePieceTokenizer

pytest.importorskip("transformers")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EDGES = ["", " ", "  ", "\n", "\n\n\n", "\t\r\n", "   leading and trailing   ", "a  b   c    d", "x\u2581y",
         "\u2581", "\u2581\u2581 \u2581", "</s> <s> <pad> <unk>", "a document quoting <|endoftext|> literally",
         "naïve café 東京 🎵 e\u0301 👍🏽 \u200b\u00a0\u3000\ufeff", "\0\x0b\x0c\x85\u2028", "12345 67.89", "<0xE2>"]


def real_documents() -> list[str]:
    """Real text: the help topics of Python's documentation (pydoc) and a few of its modules' source files."""
    from pydoc_data.topics import topics

    sources = [STDLIB / name for name in ("shlex.py", "textwrap.py", "fractions.py", "zipfile.py")]
    return list(topics.values()) + [path.read_text(encoding="utf-8") for path in sources if path.is_file()]


def manifest_of(tokenizer) -> dict:
    """The manifest entries a prep writes for a tokenizer (shards.py)."""
    info = tokenizer.info
    return {"tokenizer": info.manifest_entry(), "special_ids": {"pad": info.pad, "bos": info.bos, "eos": info.eos}}


def hf_in_fresh_process(requests: dict[str, dict], tmp: Path) -> dict[str, dict]:
    """For each HF folder: encode its texts and decode its id lists with AutoTokenizer in a new interpreter where
    the project cannot be imported (the venv's editable install would otherwise find it)."""
    script = (
        "import json, sys\n"
        "for name in ('data_prep', 'pipeline', 'launch'):\n"
        "    sys.modules[name] = None  # any import of the project fails\n"
        "from transformers import AutoTokenizer\n"
        "requests = json.load(open(sys.argv[1]))\n"
        "out = {}\n"
        "for folder, r in requests.items():\n"
        "    tok = AutoTokenizer.from_pretrained(folder)\n"
        "    out[folder] = {'ids': [tok.encode(t) for t in r['texts']], 'call': tok(r['texts'])['input_ids'],\n"
        "                   'decoded': [tok.decode(i) for i in r['decode']],\n"
        "                   'specials': {k: getattr(tok, k + '_id') for k in ('bos_token', 'eos_token',\n"
        "                                                                     'pad_token')}}\n"
        "json.dump(out, open(sys.argv[2], 'w'))\n")
    (tmp / "requests.json").write_text(json.dumps(requests))
    env = {**os.environ, "HF_HOME": str(tmp / "hf_home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", script, str(tmp / "requests.json"), str(tmp / "answers.json")],
                   cwd=tmp, env=env, check=True, timeout=120)
    return json.loads((tmp / "answers.json").read_text())


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict:
    """Tokenizers of every text-like kind trained on real documents as `pope prep` trains them, saved to a
    tokenizer folder, and their HF folders."""
    root = tmp_path_factory.mktemp("hf_tokenizer")
    docs = real_documents()
    spm = SentencePieceTokenizer.train([line for d in docs for line in d.splitlines()], 1000, seed=1, threads=1)
    from tokenizers import ByteLevelBPETokenizer  # GPT-2's files, trained here (never downloaded)

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False)
    bpe.save_model(str(root))
    gpt2 = GPT2Tokenizer.from_files(root / "vocab.json", root / "merges.txt")
    found = {}
    for kind, tokenizer in (("spm", spm), ("gpt2", gpt2), ("char", CharTokenizer()), ("kmer6", Kmer6Tokenizer()),
                            ("chars", CharVocabTokenizer(INDIRECT_VOCAB))):
        folder = root / kind / TOKENIZER_DIR
        folder.mkdir(parents=True)
        if hasattr(tokenizer, "save"):
            tokenizer.save(folder)
        assert write_hf_tokenizer(folder, manifest_of(tokenizer), root / f"hf-{kind}") is None
        found[kind] = (root / f"hf-{kind}", tokenizer)
    return {"root": root, "docs": docs, "found": found}


def dna_texts(rng: random.Random) -> list[str]:
    cases = ["", "A", "ACGTAC", "ACGTACG", "acgtacgtacgtNNacgta", "NNNN", "nnACGTTTn", "ACGTRYKMACGTAC-GT",
             "ACGT ACGT\nACGTAC", "東京ACGTACGTAC🎵", "<pad><unk>", "ACGTAC" * 50 + "GGT"]
    return cases + ["".join(rng.choice("ACGTACGTacgtNnRY-\n .東") for _ in range(rng.randrange(200)))
                    for _ in range(300)]


@pytest.fixture(scope="module")
def answers(exports, tmp_path_factory) -> dict:
    """One fresh process answers for every folder: encodings of real and edge texts, decodings of id lists."""
    rng = random.Random(0)
    requests, expected = {}, {}
    for kind, (folder, tokenizer) in exports["found"].items():
        if kind in ("char", "kmer6"):
            texts = dna_texts(rng)
        elif kind == "chars":
            texts = ["", "NZTUIGWkXFrhCJDzscat, N, +4, I", "ab, a, +1, b", "  ,,--++09"]
        else:
            texts = exports["docs"] + EDGES
        ids = [tokenizer.encode(t).tolist() for t in texts]
        special = [i for i in (tokenizer.info.bos, tokenizer.info.eos, tokenizer.info.pad) if i is not None]
        # framing and padding ids around real encodings, and (fixed vocabularies) any id at all
        framed = [[rng.choice(special) if special else 0] + seq + special for seq in ids[:40]]
        if tokenizer.info.vocab is not None:
            framed += [[rng.randrange(tokenizer.info.vocab_size) for _ in range(40)] for _ in range(100)]
        requests[str(folder)] = {"texts": texts, "decode": ids + framed}
        expected[str(folder)] = {"ids": ids, "decoded": [tokenizer.decode(i) for i in ids + framed],
                                 "texts": texts}
    got = hf_in_fresh_process(requests, tmp_path_factory.mktemp("fresh"))
    return {kind: (got[str(folder)], expected[str(folder)]) for kind, (folder, _) in exports["found"].items()}


@pytest.mark.parametrize("kind", ["spm", "gpt2", "char", "kmer6", "chars"])
def test_autotokenizer_gives_the_projects_ids_and_decodes_alike(answers, kind):
    got, want = answers[kind]
    mismatched = [t for t, g, w in zip(want["texts"], got["ids"], want["ids"]) if g != w]
    assert mismatched == []
    assert got["call"] == want["ids"]  # tokenizer(texts), the batch path lm-eval uses
    assert got["decoded"] == want["decoded"]
    if kind in ("spm", "gpt2"):
        assert sum(map(len, want["ids"])) > 100_000  # the real documents were all there
        assert got["decoded"][:len(want["texts"])] == want["texts"]  # lossless


def test_special_tokens_follow_the_data(exports, answers):
    """Text: EOS ends a document and begins the next (so HF generation stops, and lm-eval prefixes, with EOS);
    indirect: samples begin with BOS; DNA: only PAD."""
    spm = exports["found"]["spm"][1].info
    assert answers["spm"][0]["specials"] == {"bos_token": spm.eos, "eos_token": spm.eos, "pad_token": spm.pad}
    gpt2 = exports["found"]["gpt2"][1].info
    assert answers["gpt2"][0]["specials"] == {"bos_token": gpt2.eos, "eos_token": gpt2.eos, "pad_token": None}
    chars = exports["found"]["chars"][1].info
    assert answers["chars"][0]["specials"] == {"bos_token": chars.bos, "eos_token": chars.eos, "pad_token": chars.pad}
    for kind in ("char", "kmer6"):
        assert answers[kind][0]["specials"] == {"bos_token": None, "eos_token": None, "pad_token": 1}


def test_fuzzed_unicode_encodes_alike(exports):
    """Random code points with SentencePiece's awkward characters, in this process (tokenizers, no subprocess)."""
    from tokenizers import Tokenizer

    rng = random.Random(1234)
    tricky = " \t\r\n\0\x85\u00a0\u2028\u200b\u3000\ufeff\u0301\u2581<s></s><unk><pad><0xE2><|endoftext|>\\"
    texts = ["".join(rng.choice(tricky) if rng.random() < 0.4 else chr(rng.choice(
        [rng.randrange(0x80), rng.randrange(0x80, 0xD800), rng.randrange(0xE000, 0x110000)]))
        for _ in range(rng.randrange(60))) for _ in range(1500)]
    for kind in ("spm", "gpt2"):
        folder, tokenizer = exports["found"][kind]
        hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
        hf.encode_special_tokens = True  # what split_special_tokens in tokenizer_config.json sets
        got = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
        assert [t for t, g in zip(texts, got) if g != tokenizer.encode(t).tolist()] == []


def test_an_unknown_character_fails_in_both_for_the_fixed_character_vocabulary(exports):
    from tokenizers import Tokenizer

    folder, tokenizer = exports["found"]["chars"]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.encode("a\nb")
    with pytest.raises(Exception, match="UNK"):
        Tokenizer.from_file(str(folder / "tokenizer.json")).encode("a\nb")


def test_music_returns_a_note_and_writes_nothing(tmp_path):
    jsb = JSBTokenizer()
    assert write_hf_tokenizer(tmp_path, manifest_of(jsb), tmp_path / "hf") == JSB_NOTE
    remi = {"tokenizer": {"kind": "remi", "file": "remi.json"}, "special_ids": {"pad": 0, "bos": 1, "eos": 2}}
    note = write_hf_tokenizer(tmp_path / "export" / TOKENIZER_DIR, remi, tmp_path / "export")
    assert "miditok" in note and "tokenizer/remi.json" in note and "\n" not in note
    assert not (tmp_path / "hf").exists() and not (tmp_path / "export").exists()


def test_a_sentencepiece_model_not_trained_here_gets_a_note(tmp_path):
    """A unigram model with NFKC (what `--tokenizer-model` may bring) is not converted: tokenizers would differ."""
    import io

    import sentencepiece

    model = io.BytesIO()
    text = (STDLIB / "textwrap.py").read_text().splitlines()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=300,
                                             model_type="unigram", minloglevel=2, num_threads=1)
    (tmp_path / "spm.model").write_bytes(model.getvalue())
    manifest = {"tokenizer": {"kind": "sentencepiece", "file": "spm.model"},
                "special_ids": {"pad": None, "bos": 1, "eos": 2}}
    note = write_hf_tokenizer(tmp_path, manifest, tmp_path / "hf")
    assert "not BPE" in note and "normalisation nmt_nfkc" in note and "a dummy prefix" in note
    assert not (tmp_path / "hf").exists()
