"""Text prep memory: peak RSS of the main process and of each worker, for jsonl files of growing size.

    python bench/prep_memory.py [--sizes 50 500] [--workers 2]

Each corpus is ONE jsonl file of about SIZE MB: the Python standard library's source files (real text found on
every machine with Python), shuffled and repeated until the size is reached. The SentencePiece model is trained
once beforehand (not measured). Each prep runs `prep_text` with `--workers` in a forked child of this script (so
the import of streaming is not timed); peak RSS is the kernel's high-water mark (VmHWM) of the child (the main
process) and of each of its workers, polled from /proc while they run, cross-checked with getrusage(RUSAGE_CHILDREN)
after the pool is reaped (the largest worker). A forked worker's RSS includes the pages it shares with the main
process. Then the tokenizer alone encodes the same documents, in memory, in as many processes: prep/tokenizer time
is the prep's wall time over that. Goal: under 1 GB per worker whatever the file size, time ratio ≤ 1.2.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.prep_throughput import stdlib_documents, tokenizer_alone  # noqa: E402
from data_prep.mds import import_streaming  # noqa: E402
from data_prep.parallel import PrepOptions  # noqa: E402
from data_prep.text import prep_text  # noqa: E402
from data_prep.tokenizers.text import SentencePieceTokenizer  # noqa: E402


def write_jsonl(docs: list[str], path: Path, megabytes: float) -> int:
    """Shuffled rounds of `docs` as one jsonl file of about `megabytes` MB, written as it goes; returns its size."""
    size, rounds = 0, 0
    with open(path, "w") as out:
        while size < megabytes * 1e6:
            order = list(range(len(docs)))
            random.Random(rounds).shuffle(order)
            for i in order:
                line = json.dumps({"text": docs[i]}) + "\n"
                out.write(line)
                size += len(line.encode())
                if size >= megabytes * 1e6:
                    break
            rounds += 1
    return size


def _vm_hwm_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:  # the process has ended
        return None
    return None


def _children(pid: int) -> list[int]:
    pids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            pids += [int(p) for p in task.read_text().split()]
        except OSError:
            pass
    return pids


def _prep_child(path: Path, model: Path, out: Path, workers: int, report) -> None:
    start = time.perf_counter()
    manifest = prep_text([path], out, tokenizer_model=model, val_fraction=0.0005, seq_len=1024,
                         options=PrepOptions(workers=workers, progress=False))
    elapsed = time.perf_counter() - start
    tokens = sum(c["tokens"] for c in manifest["splits"].values()) - manifest["stats"]["documents"]
    report.send({"seconds": elapsed, "tokens": tokens, "samples": sum(c["samples"] for c in manifest["splits"].values()),
                 "self_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                 "children_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss})


def measure_prep(path: Path, model: Path, out: Path, workers: int) -> dict:
    """Run the prep in a forked child; poll the VmHWM of the child and of its workers until it ends."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_prep_child, args=(path, model, out, workers, send))
    child.start()
    peaks: dict[int, int] = {}
    while child.is_alive():
        for pid in [child.pid] + _children(child.pid):
            hwm = _vm_hwm_kb(pid)
            if hwm is not None:
                peaks[pid] = max(peaks.get(pid, 0), hwm)
        time.sleep(0.1)
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"the prep failed (exit code {child.exitcode})")
    result = receive.recv()
    result["main_kb"] = peaks.pop(child.pid, result["self_kb"])
    result["worker_kb"] = sorted(peaks.values(), reverse=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[50.0, 500.0], help="jsonl file sizes, MB")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args()
    import_streaming()  # once, before the children fork: `import streaming` costs seconds
    docs = stdlib_documents(1e9)  # every stdlib source file (~35 MB)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = SentencePieceTokenizer.train((l for d in docs[:400] for l in d.split("\n") if l.strip()),
                                                 args.vocab_size)
        tokenizer.save(root)
        print(f"{'file MB':>8} {'documents':>10} {'main peak MB':>13} {'worker peaks MB':>16} "
              f"{'max worker (rusage) MB':>23} {'prep s':>7} {'tokenizer s':>12} {'prep/tokenizer':>15}")
        for megabytes in args.sizes:
            path = root / f"corpus-{megabytes:g}MB.jsonl"
            size = write_jsonl(docs, path, megabytes)
            prep = measure_prep(path, root / "spm.model", root / f"out-{megabytes:g}", args.workers)
            with open(path) as lines:  # the same documents, in memory, for the tokenizer alone
                texts = [json.loads(line)["text"] for line in lines]
            units = max(args.workers, size // 1_000_000)  # pieces of ~1 MB: well balanced, a strict baseline
            tokens, seconds = tokenizer_alone(texts, tokenizer.model_proto, args.workers, units)
            del texts
            # A chunk whose packing ends on a lone EOS drops it (no target), which the count above cannot tell
            # from a document token: allow a few.
            if not 0 <= tokens - prep["tokens"] <= 1e-5 * tokens + 2:
                raise SystemExit(f"token counts differ: tokenizer {tokens}, prep {prep['tokens']}")
            workers = " ".join(f"{kb / 1024:.0f}" for kb in prep["worker_kb"])
            print(f"{size / 1e6:>8.1f} {sum(1 for _ in open(path)):>10,} {prep['main_kb'] / 1024:>13.0f} "
                  f"{workers:>16} {prep['children_kb'] / 1024:>23.0f} {prep['seconds']:>7.1f} {seconds:>12.1f} "
                  f"{prep['seconds'] / seconds:>15.2f}", flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
