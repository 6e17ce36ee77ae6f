"""DNA tokenizers: `kmer6`, the Nucleotide Transformer's 6-mers (vocab 4107), and `char`, one token a base (vocab 11).

Both read bases case-insensitively (soft-masked lower case is upper-cased) and read every byte outside ACGT as N,
so `decode(encode(s))` gives back `normalize(s)` exactly. Both work on whole numpy arrays: the human genome is
3.2 Gbp, and a per-base Python loop would take hours.

Samples carry no BOS or EOS: a genome has no natural beginning or end at a sample's edges. `<eos>` and `<bos>` stay
in the vocabulary (ids 4 and 5, kept for the 4107-token layout) but the manifest records them as unused (None);
`<pad>` (1) is what the loader pads short samples with.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_prep.shards import TokenizerInfo

SPECIALS = ("<unk>", "<pad>", "<mask>", "<cls>", "<eos>", "<bos>")  # ids 0..5 in both tokenizers
PAD_ID = SPECIALS.index("<pad>")
NT_BASES = "ATCG"  # the Nucleotide Transformer's nucleotide order: its 6-mers count in base 4 with A<T<C<G

# byte → base code 0..3 in NT_BASES order, 4 for N and for every other byte (IUPAC codes, stray characters)
_CODES = np.full(256, 4, dtype=np.uint8)
for _code, _base in enumerate(NT_BASES.encode()):
    _CODES[_base] = _CODES[_base | 0x20] = _code  # upper and lower case
_COMPLEMENT = bytes.maketrans(b"ACGTN", b"TGCAN")
_ACGTN = np.zeros(256, dtype=bool)
_ACGTN[list(b"ACGTNacgtn")] = True


def as_uint8(seq: str | bytes | np.ndarray) -> np.ndarray:
    """The bytes of a DNA string as a uint8 array (no copy for bytes and uint8 arrays)."""
    if isinstance(seq, np.ndarray):
        return seq.astype(np.uint8, copy=False)
    if isinstance(seq, str):
        seq = seq.encode("ascii", errors="replace")  # a non-ASCII character becomes '?', read as N
    return np.frombuffer(seq, dtype=np.uint8)


def base_codes(seq: str | bytes | np.ndarray) -> np.ndarray:
    """Base codes (A=0, T=1, C=2, G=3, anything else 4 = N) of a DNA string, as uint8."""
    return _CODES[as_uint8(seq)]


def count_non_acgtn(seq: str | bytes | np.ndarray) -> int:
    """How many characters are none of A, C, G, T, N (either case): the ones read as N."""
    return len(seq) - int(np.count_nonzero(_ACGTN[as_uint8(seq)]))


def normalize(seq: str | bytes) -> str:
    """What the tokenizers see: upper case, every character outside ACGT replaced by N."""
    return np.frombuffer(NT_BASES.encode() + b"N", dtype=np.uint8)[base_codes(seq)].tobytes().decode()


class _DnaTokenizer:
    """Shared by both: decoding through a spelling table, loading from a manifest entry."""

    kind = ""
    k = 1  # bases per token where the sequence is free of N

    def __init__(self, vocab: list[str]) -> None:
        self.info = TokenizerInfo(kind=self.kind, vocab_size=len(vocab), pad=PAD_ID, bos=None, eos=None, vocab=vocab)
        self.n_id = vocab.index("N")
        # id → its bases, padded to k; specials spell nothing (decode drops padding and the like)
        self._spelling = np.zeros((len(vocab), self.k), dtype=np.uint8)
        self._length = np.zeros(len(vocab), dtype=np.int64)
        for i, token in enumerate(vocab):
            if token not in SPECIALS:
                self._spelling[i, :len(token)] = np.frombuffer(token.encode(), dtype=np.uint8)
                self._length[i] = len(token)

    @classmethod
    def from_manifest(cls, entry: dict[str, Any], tokenizer_dir: Path | None = None) -> "_DnaTokenizer":
        tokenizer = cls()
        if entry.get("kind") != cls.kind or entry.get("vocab", tokenizer.info.vocab) != tokenizer.info.vocab:
            raise ValueError(f"the manifest's tokenizer ({entry.get('kind')}) is not this {cls.kind} vocabulary")
        return tokenizer

    def encode(self, seq: str | bytes | np.ndarray) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Token ids → bases (upper case, N for anything that was not ACGT); special tokens spell nothing."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.info.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.info.vocab_size}); got {ids.min()}..{ids.max()}")
        keep = np.arange(self.k) < self._length[ids][:, None]
        return self._spelling[ids][keep].tobytes().decode()

    def reverse_complement(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The tokens of the other strand read 5'→3' (the training loader's augmentation). For 6-mers the count
        can differ from len(ids): the strand is tokenized afresh, so its leftover single bases fall elsewhere."""
        return self.encode(self.decode(ids).encode().translate(_COMPLEMENT)[::-1])


class Kmer6Tokenizer(_DnaTokenizer):
    """The Nucleotide Transformer's non-overlapping 6-mer tokenizer (vocab 4107).

    Ids: 0-5 `<unk> <pad> <mask> <cls> <eos> <bos>`; 6-4101 the 4096 6-mers in `itertools.product("ATCG",
    repeat=6)` order (AAAAAA, AAAAAT, AAAAAC, AAAAAG, AAAATA, ...); 4102-4106 the single bases A, T, C, G, N.

    Rule: the sequence is split at every N; each N-free run is cut into 6-mers from its left end and the run's last
    len % 6 bases become single-base tokens; each N is one token. Verified against instadeepai/nucleotide-transformer,
    `nucleotide_transformer/tokenizers.py`, `NucleotidesKmersTokenizer.tokenize` (which
    FixedSizeNucleotidesKmersTokenizer inherits): it does `sequence.split("N")`, takes `len(split) // k` k-mers
    from the left of each piece, spells the remainder base by base, and emits "N" between pieces; its docstring's
    k=5 example is `ATCGAATNGGCGATGCAC -> ATCGA A T N GGCGA TGCAC`. Its 6-mers come from `product(NUCLEOTIDES,
    repeat=k)` with NUCLEOTIDES = ["A", "T", "C", "G"] (constants.py), then the single bases A, T, C, G, N. One
    difference in ids: that repository's `compute_dcnuc_tokens_to_ids` puts <eos>, <bos> after the bases (4105,
    4106); here all six specials come first, the layout this project fixes. Where NT's tokenizer fails on a
    character outside ATCGN (no such token), this one reads N.
    """

    kind = "kmer6"
    k = 6
    KMER_OFFSET = len(SPECIALS)  # id of AAAAAA
    BASE_OFFSET = KMER_OFFSET + 4**6  # id of the single base A

    def __init__(self) -> None:
        kmers = ["".join(p) for p in itertools.product(NT_BASES, repeat=self.k)]
        super().__init__(list(SPECIALS) + kmers + list(NT_BASES + "N"))

    def encode(self, seq: str | bytes | np.ndarray) -> np.ndarray:
        """A DNA string → int64 token ids, without BOS/EOS."""
        codes = base_codes(seq)
        is_n = codes == 4
        starts, ends = _runs(~is_n)  # the N-free runs [start, end)
        lengths = ends - starts
        full = lengths // self.k
        kmer_at = _ranges(starts, full, self.k)  # first base of every 6-mer
        tail_at = _ranges(starts + self.k * full, lengths - self.k * full, 1)  # the single bases ending a run
        # what begins at each position: 0 nothing (inside a 6-mer), 1 a single-base token, 2 a 6-mer
        begins = is_n.view(np.uint8).copy()
        begins[tail_at] = 1
        begins[kmer_at] = 2
        at = np.flatnonzero(begins)
        ids = codes[at].astype(np.int64) + self.BASE_OFFSET
        ids[begins[at] == 2] = self.KMER_OFFSET + _base4(codes, kmer_at, self.k)  # both in position order
        return ids


class CharTokenizer(_DnaTokenizer):
    """One token per base: ids 0-5 the same specials as kmer6 (so pad is 1 in both), then A, C, G, T, N (6-10)."""

    kind = "char"
    k = 1

    def __init__(self) -> None:
        super().__init__(list(SPECIALS) + list("ACGTN"))
        self._ids = np.full(256, self.n_id, dtype=np.int64)
        for base in "ACGT":
            self._ids[ord(base)] = self._ids[ord(base.lower())] = self.info.vocab.index(base)

    def encode(self, seq: str | bytes | np.ndarray) -> np.ndarray:
        """A DNA string → int64 token ids, without BOS/EOS."""
        return self._ids[as_uint8(seq)]


@functools.lru_cache(maxsize=None)
def dna_tokenizer(kind: str) -> Kmer6Tokenizer | CharTokenizer:
    """The tokenizer of a kind ("kmer6" or "char"), built once per process."""
    classes = {"kmer6": Kmer6Tokenizer, "char": CharTokenizer}
    if kind not in classes:
        raise ValueError(f"unknown DNA tokenizer {kind!r}; choose kmer6 or char")
    return classes[kind]()


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and (exclusive) ends of the runs of True in a boolean array."""
    edges = np.diff(np.concatenate(([False], mask, [False])).view(np.int8))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


def _ranges(starts: np.ndarray, counts: np.ndarray, step: int) -> np.ndarray:
    """Concatenation of `starts[i] + step * arange(counts[i])` over i, without a Python loop."""
    total = int(counts.sum())
    # element j of range i sits at output index first[i] + j, so its value is (starts[i] - step*first[i]) + step*index
    first = np.cumsum(counts) - counts
    return np.repeat(starts - step * first, counts) + step * np.arange(total)


def _base4(codes: np.ndarray, at: np.ndarray, k: int) -> np.ndarray:
    """The base-4 number spelled by codes[at[i]:at[i]+k], most significant first: a k-mer's index."""
    value = np.zeros(len(at), dtype=np.int64)
    for offset in range(k):
        value = value * 4 + codes[at + offset]
    return value
