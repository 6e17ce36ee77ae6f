"""`pope prep <corpus>`: argument parsing only; the work is in data_prep/<corpus>.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from data_prep.parallel import PrepOptions


def _common(parser: argparse.ArgumentParser, seq_len: int) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (DIR/train, DIR/val, manifest, DONE)")
    parser.add_argument("--seq-len", type=int, default=seq_len,
                        help=f"model context; each sample holds up to seq_len+1 tokens (default {seq_len})")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default: one per core)")
    parser.add_argument("--shard-index", type=int, default=0, help="process part i of --num-shards (job arrays)")
    parser.add_argument("--num-shards", type=int, default=1, help="split the inputs into this many parts")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing, different output")
    parser.add_argument("--max-skip-fraction", type=float, default=0.01,
                        help="fail when more than this fraction of inputs are bad (default 0.01)")
    parser.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--slurm", nargs="*", default=None, metavar="slurm.key=value",
                        help="run as a SLURM job array of --num-shards tasks plus a merge job (e.g. --slurm "
                             "slurm.partition=cpu slurm.time=120)")
    parser.add_argument("--wait", action="store_true", help="with --slurm: wait until the merge job is done")


def _options(args: argparse.Namespace) -> PrepOptions:
    return PrepOptions(workers=args.workers, shard_index=args.shard_index, num_shards=args.num_shards,
                       overwrite=args.overwrite, max_skip_fraction=args.max_skip_fraction,
                       compression=args.compression, progress=not args.no_progress)


def _report(out: Path, manifest: dict | None) -> int:
    if manifest is None:
        print(f"{out}: already prepared with these arguments; nothing to do (--overwrite to redo)")
        return 0
    counts = ", ".join(f"{split} {c['samples']:,} samples / {c['tokens']:,} tokens"
                       for split, c in manifest["splits"].items())
    print(f"{out}: {counts}; vocab {manifest['vocab_size']}; {len(manifest['skipped'])} inputs skipped")
    return 0


def _run(args: argparse.Namespace, function: str, kwargs: dict, tokenizer: dict | None = None) -> int:
    """Run a prep here, or (with --slurm) as a SLURM job array of --num-shards tasks plus a merge job."""
    if args.slurm is None:
        module, name = function.split(":")
        prep = getattr(__import__(module, fromlist=[name]), name)
        return _report(args.out, prep(out=args.out, options=_options(args), **kwargs))
    from launch.slurm import submit_prep
    from pipeline.config import Config, apply_overrides

    bad = [item for item in args.slurm if not item.startswith("slurm.")]
    if bad:
        raise ValueError(f"--slurm takes slurm.key=value settings; got {', '.join(bad)}")
    if args.shard_index:
        raise ValueError("--shard-index is chosen per array task with --slurm; give --num-shards only")
    slurm = apply_overrides(Config(), args.slurm).slurm
    return submit_prep(function, kwargs, args.out, _options(args), slurm, tokenizer=tokenizer, wait=args.wait)


def cmd_text(args: argparse.Namespace) -> int:
    kwargs = dict(inputs=[p.resolve() for p in args.input], tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                  tokenizer_model=args.tokenizer_model, gpt2_vocab=args.gpt2_vocab, gpt2_merges=args.gpt2_merges,
                  tokenizer_sample_docs=args.tokenizer_sample_docs, val_fraction=args.val_fraction,
                  text_field=args.text_field, seed=args.seed, seq_len=args.seq_len)
    needs_tokenizer = args.slurm is not None and args.tokenizer == "sentencepiece" and args.tokenizer_model is None
    return _run(args, "data_prep.text:prep_text", kwargs, tokenizer=kwargs if needs_tokenizer else None)


def cmd_genome(args: argparse.Namespace) -> int:
    return _run(args, "data_prep.genome:prep_genome", dict(
        fasta=args.fasta.resolve(), bed=args.bed.resolve() if args.bed else None, tokenizer=args.tokenizer,
        val_chroms=args.val_chroms, test_chroms=args.test_chroms, seq_len=args.seq_len))


def cmd_jsb(args: argparse.Namespace) -> int:
    if (args.input is None) == (not args.from_music21):
        raise ValueError("give exactly one of --input FILE.json and --from-music21")
    return _run(args, "data_prep.jsb:prep_jsb", dict(
        input=args.input.resolve() if args.input else None, from_music21=args.from_music21, seq_len=args.seq_len))


def cmd_midi(args: argparse.Namespace) -> int:
    return _run(args, "data_prep.midi:prep_midi", dict(
        input=args.input.resolve(), transpose=args.transpose, seed=args.seed, seq_len=args.seq_len))


def cmd_indirect(args: argparse.Namespace) -> int:
    return _run(args, "data_prep.indirect:prep_indirect", dict(
        train=args.train, val=args.val, test=args.test, seed=args.seed, seq_len=args.seq_len))


def cmd_merge(args: argparse.Namespace) -> int:
    from data_prep.shards import merge_parts

    return _report(args.out, merge_parts(args.out, args.parts, overwrite=args.overwrite))


def add_prep_parser(sub: argparse._SubParsersAction) -> None:
    prep = sub.add_parser("prep", help="turn a raw corpus into streaming shards (once)")
    corpora = prep.add_subparsers(dest="corpus", required=True, metavar="CORPUS")

    p = corpora.add_parser("text", help="OpenWebText-style text: xz tarballs, jsonl(.gz/.zst), parquet, .txt")
    p.add_argument("--input", type=Path, nargs="+", required=True,
                   help="files or folders: urlsf_subset*.xz (or a tarball of them), *.jsonl[.gz|.zst], *.parquet, "
                        "*.txt")
    p.add_argument("--tokenizer", choices=["sentencepiece", "gpt2"], default="sentencepiece")
    p.add_argument("--vocab-size", type=int, default=32000, help="SentencePiece vocabulary (default 32000)")
    p.add_argument("--tokenizer-model", type=Path, default=None,
                   help="an existing SentencePiece .model to use instead of training one (required with shards)")
    p.add_argument("--tokenizer-sample-docs", type=int, default=50_000,
                   help="documents sampled (seeded) to train SentencePiece on (default 50000)")
    p.add_argument("--gpt2-vocab", type=Path, default=None, help="GPT-2 vocab.json (with --tokenizer gpt2)")
    p.add_argument("--gpt2-merges", type=Path, default=None, help="GPT-2 merges.txt (with --tokenizer gpt2)")
    p.add_argument("--val-fraction", type=float, default=0.0005, help="documents held out for validation")
    p.add_argument("--text-field", default="text", help="the jsonl field / parquet column holding the text")
    p.add_argument("--seed", type=int, default=1234)
    _common(p, seq_len=1024)
    p.set_defaults(func=cmd_text)

    p = corpora.add_parser("genome", help="FASTA (.fa/.fa.gz) + BED intervals → kmer6 (6-mer) or char (base) tokens")
    p.add_argument("--fasta", type=Path, required=True)
    p.add_argument("--bed", type=Path, default=None, help="intervals `chrom start end split` (HyenaDNA layout)")
    p.add_argument("--tokenizer", choices=["kmer6", "char"], default="kmer6")
    p.add_argument("--val-chroms", nargs="*", default=[], help="without --bed: records held out for validation")
    p.add_argument("--test-chroms", nargs="*", default=[], help="without --bed: records held out for test")
    _common(p, seq_len=1000)
    p.set_defaults(func=cmd_genome)

    p = corpora.add_parser("jsb", help="JSB chorales 16th-note JSON (or music21's Bach chorales) → raster tokens")
    p.add_argument("--input", type=Path, default=None, help="the JSON with train/valid/test")
    p.add_argument("--from-music21", action="store_true", help="build it from the chorales bundled with music21")
    _common(p, seq_len=2048)
    p.set_defaults(func=cmd_jsb)

    p = corpora.add_parser("midi", help="a folder of MIDI files (MAESTRO layout) → REMI tokens via miditok")
    p.add_argument("--input", type=Path, required=True, help="folder of .mid/.midi (with MAESTRO's CSV if present)")
    p.add_argument("--transpose", type=int, default=3, help="train split transposed by -N..+N semitones")
    p.add_argument("--seed", type=int, default=1234, help="seed of the 90/5/5 split when there is no CSV")
    _common(p, seq_len=2048)
    p.set_defaults(func=cmd_midi)

    p = corpora.add_parser("indirect", help="generate the indirect indexing task (no input)")
    p.add_argument("--train", type=int, default=1_000_000, help="training examples (default 1000000)")
    p.add_argument("--val", type=int, default=10_000, help="validation examples (default 10000)")
    p.add_argument("--test", type=int, default=10_000, help="test examples (default 10000)")
    p.add_argument("--seed", type=int, default=1234)
    _common(p, seq_len=64)
    p.set_defaults(func=cmd_indirect)

    p = corpora.add_parser("merge", help="join the outputs of --shard-index/--num-shards runs")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("parts", type=Path, nargs="+", help="the part folders, any order")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_merge)
