"""Text prep throughput: the whole `pope prep text` against the tokenizer alone on the same text, 1 and 2 workers.

    python bench/prep_throughput.py [--input FILES...] [--megabytes 24]

Without --input the corpus is the Python standard library's source files (real text found on every machine with
Python), written as jsonl units. Both measurements use the same SentencePiece model (trained once, not timed) and
the same documents. "tokenizer alone" is SentencePiece encoding the in-memory documents in `workers` processes, one
thread each; "whole prep" is prep_text end to end (read, decode, tokenize, hold out, pack, write MDS shards,
manifest, DONE). Goal: whole prep within 1.2x of the tokenizer alone, near-linear in workers.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.mds import import_streaming  # noqa: E402
from data_prep.parallel import PrepOptions  # noqa: E402
from data_prep.text import prep_text  # noqa: E402
from data_prep.tokenizers.text import SentencePieceTokenizer  # noqa: E402

_TOKENIZER: SentencePieceTokenizer | None = None


def stdlib_documents(megabytes: float) -> list[str]:
    docs, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        text = path.read_text(errors="replace")
        docs.append(text)
        size += len(text.encode())
        if size >= megabytes * 1e6:
            break
    return docs


def write_units(docs: list[str], folder: Path, units: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for k in range(units):
        path = folder / f"part-{k:03d}.jsonl"
        path.write_text("\n".join(json.dumps({"text": d}) for d in docs[k::units]) + "\n")
        paths.append(path)
    return paths


def _init(model: bytes) -> None:
    global _TOKENIZER
    _TOKENIZER = SentencePieceTokenizer(model)


def _encode(docs: list[str]) -> int:
    return sum(len(ids) for ids in _TOKENIZER.encode_batch(docs))


def tokenizer_alone(docs: list[str], model: bytes, workers: int, units: int) -> tuple[int, float]:
    chunks = [docs[k::units] for k in range(units)]
    start = time.perf_counter()
    if workers == 1:
        _init(model)
        tokens = sum(_encode(c) for c in chunks)
    else:
        with multiprocessing.get_context("fork").Pool(workers, _init, (model,)) as pool:
            tokens = sum(pool.map(_encode, chunks, chunksize=1))
    return tokens, time.perf_counter() - start


def whole_prep(inputs: list[Path], model_path: Path, workers: int, out: Path) -> tuple[int, float]:
    start = time.perf_counter()
    manifest = prep_text(inputs, out, tokenizer_model=model_path, val_fraction=0.0005, seq_len=1024,
                         options=PrepOptions(workers=workers, progress=False))
    elapsed = time.perf_counter() - start
    # EOS separators are not produced by the tokenizer alone: count document tokens only.
    tokens = sum(c["tokens"] for c in manifest["splits"].values()) - manifest["stats"]["documents"]
    return tokens, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=40.0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of each measurement")
    parser.add_argument("--units", type=int, default=48)
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args()
    import_streaming()  # once, untimed: `import streaming` costs seconds (it imports transformers)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs = stdlib_documents(args.megabytes)
        inputs = write_units(docs, root / "corpus", args.units)
        tokenizer = SentencePieceTokenizer.train((l for d in docs[:400] for l in d.split("\n") if l.strip()),
                                                 args.vocab_size)
        tokenizer.save(root)
        size = sum(len(d.encode()) for d in docs) / 1e6
        print(f"corpus: {len(docs)} documents, {size:.1f} MB in {args.units} jsonl units; "
              f"SentencePiece BPE vocab {args.vocab_size}")
        print(f"{'workers':>7} {'tokenizer tok/s':>16} {'prep tok/s':>12} {'prep/tokenizer time':>20}")
        base = {}
        for workers in (1, 2):
            t_tokens, t_time, p_tokens, p_time = 0, float("inf"), 0, float("inf")
            for repeat in range(args.repeats):  # interleaved, best of each: both see the same machine state
                tokens, elapsed = tokenizer_alone(docs, tokenizer.model_proto, workers, args.units)
                t_tokens, t_time = tokens, min(t_time, elapsed)
                tokens, elapsed = whole_prep(inputs, root / "spm.model", workers, root / f"out{workers}-{repeat}")
                p_tokens, p_time = tokens, min(p_time, elapsed)
            if t_tokens != p_tokens:
                raise SystemExit(f"token counts differ: tokenizer {t_tokens}, prep {p_tokens}")
            base.setdefault("tok", t_tokens / t_time)
            base.setdefault("prep", p_tokens / p_time)
            print(f"{workers:>7} {t_tokens / t_time:>16,.0f} {p_tokens / p_time:>12,.0f} {p_time / t_time:>20.2f}")
        print(f"scaling 1→2 workers: tokenizer {(t_tokens / t_time) / base['tok']:.2f}x, "
              f"prep {(p_tokens / p_time) / base['prep']:.2f}x")


if __name__ == "__main__":
    main()
