"""Tokenizers for every corpus, behind one small interface (see base.py).

- text.py:  SentencePiece BPE with byte fallback (trained on the corpus), GPT-2 byte-level BPE (local files), `chars`
            (indirect indexing's fixed vocabulary of characters)
- dna.py:   `kmer6`, the Nucleotide Transformer's 6-mers (vocab 4107), `char`, one token a base (vocab 11)
- music.py: JSB chorale raster vocabulary (90 ids), REMI through miditok
- hf.py:    the same tokenizers as Hugging Face files (tokenizer.json) for an export, or a note where none fits
"""

from data_prep.tokenizers.base import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
