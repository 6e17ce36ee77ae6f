"""Tokenizers for every corpus, behind one small interface (see base.py).

- text.py:  SentencePiece BPE with byte fallback (trained on the corpus), GPT-2 byte-level BPE (local files)
- dna.py:   Nucleotide Transformer 6-mers (vocab 4107), single characters
- music.py: JSB chorale raster vocabulary (90 ids), REMI through miditok
"""

from data_prep.tokenizers.base import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
