"""Text tokenizers: SentencePiece BPE trained on the corpus, or GPT-2's byte-level BPE from local files.

Both are lossless on any text (decode(encode(t)) == t, tested on a seeded fuzz of all of Unicode): SentencePiece
through byte fallback with identity normalisation and no whitespace rewriting, GPT-2 by construction (bytes
mapped to symbols). SentencePiece writes a space as U+2581 (▁) inside its pieces and decodes every ▁ back to a
space, so a literal ▁ in a document would come back as a space: it is encoded as its three UTF-8 byte pieces
instead (<0xE2><0x96><0x81>), which decode to ▁ itself.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from data_prep.shards import TokenizerInfo

SPM_FILE = "spm.model"
GPT2_FILE = "gpt2-tokenizer.json"
GPT2_EOS = "<|endoftext|>"
# SentencePiece ids of the specials: fixed so that every model trained here agrees.
SPM_UNK, SPM_BOS, SPM_EOS, SPM_PAD = 0, 1, 2, 3
SPM_SPACE = "\u2581"  # ▁, SentencePiece's stand-in for a space inside pieces


class SentencePieceTokenizer:
    """SentencePiece BPE with byte fallback; documents are separated by EOS when packed."""

    def __init__(self, model_proto: bytes) -> None:
        import sentencepiece

        self.model_proto = model_proto
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.info = TokenizerInfo(kind="sentencepiece", vocab_size=self.processor.vocab_size(), pad=SPM_PAD,
                                  bos=SPM_BOS, eos=SPM_EOS, file=SPM_FILE)
        # The byte pieces that spell a literal ▁; None for a model without byte fallback (one not trained here),
        # which can only give ▁ back as a space.
        byte_ids = [self.processor.piece_to_id(f"<0x{b:02X}>") for b in SPM_SPACE.encode()]
        self._literal_space = byte_ids if all(self.processor.is_byte(i) for i in byte_ids) else None

    @classmethod
    def train(cls, sentences: Iterable[str], vocab_size: int, seed: int = 1234,
              threads: int | None = None) -> "SentencePieceTokenizer":
        """Train on an iterable of sentences (lines of documents)."""
        import sentencepiece

        if vocab_size < 260 + 4:
            raise ValueError(f"--vocab-size must be at least 264 (256 byte pieces + specials); got {vocab_size}")
        model = io.BytesIO()
        sentencepiece.set_random_generator_seed(seed)
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=model, model_type="bpe", vocab_size=vocab_size,
                byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
                remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
                allow_whitespace_only_pieces=True, max_sentence_length=1 << 16, input_sentence_size=0,
                unk_id=SPM_UNK, bos_id=SPM_BOS, eos_id=SPM_EOS, pad_id=SPM_PAD,
                num_threads=threads or len(os.sched_getaffinity(0)), minloglevel=2)
        except RuntimeError as err:  # e.g. "Vocabulary size is too high": too little text for the vocabulary
            raise ValueError(f"SentencePiece training failed: {' '.join(str(err).split())}") from None
        return cls(model.getvalue())

    @classmethod
    def from_file(cls, path: Path) -> "SentencePieceTokenizer":
        try:
            return cls(Path(path).read_bytes())
        except RuntimeError as err:
            raise ValueError(f"{path} is not a SentencePiece model: {' '.join(str(err).split())}") from None

    @classmethod
    def from_manifest(cls, entry: dict, tokenizer_dir: Path) -> "SentencePieceTokenizer":
        return cls.from_file(tokenizer_dir / entry["file"])

    def save(self, folder: Path) -> None:
        (folder / SPM_FILE).write_bytes(self.model_proto)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.encode_batch([text])[0], dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text. Texts holding a literal ▁ (rare) take a slower path; the rest go through
        SentencePiece's batch encoder as they are."""
        texts = list(texts)
        if self._literal_space is None:
            plain = list(range(len(texts)))
        else:
            plain = [i for i, text in enumerate(texts) if SPM_SPACE not in text]  # a C-speed scan per text
        # One thread: parallelism comes from the prep's worker processes (SentencePiece defaults to every core).
        encoded = self.processor.encode([texts[i] for i in plain], num_threads=1)
        if len(plain) == len(texts):
            return encoded
        out: list[list[int]] = [[] for _ in texts]
        for i, ids in zip(plain, encoded):
            out[i] = ids
        for i in sorted(set(range(len(texts))) - set(plain)):
            out[i] = self._encode_with_literal_spaces(texts[i])
        return out

    def _encode_with_literal_spaces(self, text: str) -> list[int]:
        """The text between literal ▁ encoded as usual, each ▁ as its byte pieces (which decode to ▁, where the
        piece ▁ would decode to a space)."""
        segments = text.split(SPM_SPACE)
        ids: list[int] = []
        for index, segment_ids in enumerate(self.processor.encode(segments, num_threads=1)):
            if index:
                ids.extend(self._literal_space)
            ids.extend(segment_ids)
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.processor.decode([int(i) for i in ids])


class GPT2Tokenizer:
    """GPT-2's byte-level BPE (vocab 50257) from a local vocab.json + merges.txt; never touches the network.

    `<|endoftext|>` is the document separator. It is looked up in the vocabulary but not registered as a special
    token, so the literal string inside a document is encoded as ordinary text (like tiktoken's encode_ordinary),
    and no document can forge a separator.
    """

    def __init__(self, tokenizer_json: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer_json = tokenizer_json
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        eos = self.tokenizer.token_to_id(GPT2_EOS)
        if eos is None:
            raise ValueError(f"the GPT-2 vocabulary has no {GPT2_EOS} token; is it GPT-2's vocab.json?")
        self.info = TokenizerInfo(kind="gpt2", vocab_size=self.tokenizer.get_vocab_size(), pad=None, bos=None,
                                  eos=eos, file=GPT2_FILE)

    @classmethod
    def from_files(cls, vocab: Path, merges: Path) -> "GPT2Tokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        for path, what in ((vocab, "--gpt2-vocab"), (merges, "--gpt2-merges")):
            if path is None or not Path(path).is_file():
                raise ValueError(f"{what} must name a local file (got {path}); the tokenizer is never downloaded")
        try:
            model = models.BPE.from_file(str(vocab), str(merges))
        except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception types
            raise ValueError(f"cannot read GPT-2 BPE files {vocab}, {merges}: {err}") from None
        tokenizer = Tokenizer(model)
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        return cls(tokenizer.to_str())

    @classmethod
    def from_manifest(cls, entry: dict, tokenizer_dir: Path) -> "GPT2Tokenizer":
        return cls((tokenizer_dir / entry["file"]).read_text())

    def save(self, folder: Path) -> None:
        (folder / GPT2_FILE).write_text(self.tokenizer_json)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)



class CharVocabTokenizer:
    """One token per character of a fixed vocabulary (the manifest lists it); used by the indirect indexing task.

    `vocab` holds special tokens first (`<pad>`, `<bos>`, `<eos>` where present), then single characters.
    """

    def __init__(self, vocab: Sequence[str], kind: str = "chars") -> None:
        self.vocab = list(vocab)
        self.index = {token: i for i, token in enumerate(self.vocab)}
        special = lambda name: self.index.get(f"<{name}>")
        self.info = TokenizerInfo(kind=kind, vocab_size=len(self.vocab), pad=special("pad"), bos=special("bos"),
                                  eos=special("eos"), vocab=self.vocab)

    @classmethod
    def from_manifest(cls, entry: dict, tokenizer_dir: Path) -> "CharVocabTokenizer":
        return cls(entry["vocab"], kind=entry["kind"])

    def encode(self, text: str) -> np.ndarray:
        try:
            return np.array([self.index[c] for c in text], dtype=np.int64)
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary") from None

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return "".join(self.vocab[int(i)] for i in ids if not self.vocab[int(i)].startswith("<"))
