"""Tokens/s of `pope eval length`'s scoring, PoPE against RoPE, side by side.

    python bench/eval_length.py [--sizes tiny,124m] [--lengths 1024,2048] [--max-samples 2] [--repeats 3]
    python bench/eval_length.py --memory-length 10240      # seconds and peak memory of one 124M PoPE window

For each size, a random-initialised PoPE model and its RoPE twin (identical but for the position encoding) score
the same random windows of L+1 tokens through `pipeline.length_eval.position_nll`, the function `pope eval length`
runs per batch (body once, then the tied head and log-softmax in chunks of positions; bf16 autocast on CUDA, fp32
on CPU), with the batch size the command uses (max(1, 16384 // L) windows, at most --max-samples). The models
alternate repeat by repeat so both see the same machine state; after one warm-up the median time of each gives
tokens/s and the PoPE/RoPE time ratio. Reading the samples is left out: it is the same for both and ~1000× faster.
Goal on CPU: PoPE/RoPE <= 1.15.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.length_eval import DEFAULT_BATCH_TOKENS, position_nll  # noqa: E402
from pipeline.model import Transformer  # noqa: E402

SIZES = {  # name: model shape (max_seq_len is the training length; evaluation reads past it)
    "tiny": dict(vocab_size=320, d_model=64, n_heads=4, n_layers=2, max_seq_len=128),
    "124m": dict(vocab_size=50257, d_model=768, n_heads=12, n_layers=12, max_seq_len=1024),
}


def time_scoring(size: str, length: int, samples: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds to score `samples` windows of `length` targets, for PoPE and for RoPE."""
    shape = SIZES[size]
    models = {}
    for position in ("pope", "rope"):
        torch.manual_seed(0)
        models[position] = Transformer(ModelConfig(**shape, position=position)).to(device).eval()
    windows = torch.randint(0, shape["vocab_size"], (samples, length + 1))
    batch = max(1, DEFAULT_BATCH_TOKENS // length)
    times: dict[str, list[float]] = {"pope": [], "rope": []}
    for repeat in range(repeats + 1):  # repeat 0 warms up (allocations, kernel choice) and is not counted
        for position in ("pope", "rope") if repeat % 2 == 0 else ("rope", "pope"):
            _sync(device)
            start = time.perf_counter()
            for first in range(0, samples, batch):
                position_nll(models[position], windows[first:first + batch])
            _sync(device)
            if repeat:
                times[position].append(time.perf_counter() - start)
    return {position: statistics.median(values) for position, values in times.items()}


def peak_memory(length: int, device: torch.device) -> str:
    """One window of `length` targets through the 124M PoPE model: seconds and peak memory (CPU: the process's peak
    RSS, which includes the model; CUDA: torch's peak allocation)."""
    import resource

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SIZES["124m"], position="pope")).to(device).eval()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    position_nll(model, torch.randint(0, SIZES["124m"]["vocab_size"], (1, length + 1)))
    _sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        return f"124m PoPE, one window of L={length}: {seconds:.1f} s, peak CUDA allocation " \
               f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return f"124m PoPE, one window of L={length}: {seconds:.1f} s, peak RSS {after:,.0f} MB " \
           f"({before:,.0f} MB before scoring: the model and the imports)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,124m")
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--max-samples", type=int, default=2, help="windows per length (the command's --max-samples)")
    parser.add_argument("--tiny-samples", type=int, default=16, help="windows per length for the tiny size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory-length", type=int, default=0,
                        help="instead: time and peak memory of one 124M PoPE window of this length (e.g. 10240)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.memory_length:
        print(peak_memory(args.memory_length, device))
        return
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'size':>5} {'L':>6} {'windows':>7} {'PoPE tok/s':>11} {'RoPE tok/s':>11} {'PoPE s':>8} {'RoPE s':>8} "
          f"{'PoPE/RoPE':>9}")
    for size in args.sizes.split(","):
        samples = args.tiny_samples if size == "tiny" else args.max_samples
        for length in (int(x) for x in args.lengths.split(",")):
            t = time_scoring(size, length, samples, args.repeats, device)
            tokens = samples * length
            print(f"{size:>5} {length:>6} {samples:>7} {tokens / t['pope']:>11,.0f} {tokens / t['rope']:>11,.0f} "
                  f"{t['pope']:>8.3f} {t['rope']:>8.3f} {t['pope'] / t['rope']:>9.3f}", flush=True)


if __name__ == "__main__":
    main()
