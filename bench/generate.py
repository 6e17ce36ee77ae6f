"""Decoding speed of `pope generate`: with the KV cache against re-running the sequence, PoPE against RoPE.

    python bench/generate.py [--sizes tiny,124m] [--new-tokens 1024] [--uncached-tokens tiny=1024,124m=256]

For each size, a random-initialised PoPE model and its RoPE twin (identical but for the position encoding) run
`pipeline.generate.generate` (what `pope generate` runs after loading) from the same 16-token prompt, greedy, fp32,
one sequence, with the cache for `--new-tokens` tokens and without it for the size's `--uncached-tokens` (re-running
the whole sequence each step costs O(T²) and takes hours at 124M and 1,024 tokens on a CPU). Each measurement
follows a short warm-up; PoPE and RoPE alternate. Printed: tokens/s of each, the cached/uncached speed-up at the
uncached length (both measured over the same number of new tokens), and the PoPE/RoPE time ratio.
Goals: cached ≥ 10× faster than uncached at 1,024 new tokens on 124M; PoPE/RoPE ≤ 1.15.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.generate import Sampling, generate  # noqa: E402
from pipeline.model import Transformer  # noqa: E402

SIZES = {
    "tiny": dict(vocab_size=320, d_model=64, n_heads=4, n_layers=2, max_seq_len=128),
    "124m": dict(vocab_size=50257, d_model=768, n_heads=12, n_layers=12, max_seq_len=1024),
}
PROMPT_TOKENS = 16
WARMUP_TOKENS = 8
POSITIONS = ("pope", "rope")


def timed(model: Transformer, prompt: list[int], new_tokens: int, use_cache: bool) -> float:
    """Seconds to generate new_tokens greedily (after a warm-up of a few tokens)."""
    greedy = Sampling(temperature=0)
    generate(model, prompt, WARMUP_TOKENS, greedy, use_cache=use_cache)
    start = time.perf_counter()
    out = generate(model, prompt, new_tokens, greedy, use_cache=use_cache)
    seconds = time.perf_counter() - start
    assert len(out) == new_tokens
    return seconds


def bench_size(size: str, new_tokens: int, uncached_tokens: int) -> None:
    models = {}
    for position in POSITIONS:
        torch.manual_seed(0)
        models[position] = Transformer(ModelConfig(**SIZES[size], position=position)).float().eval()
    prompt = torch.randint(0, SIZES[size]["vocab_size"], (PROMPT_TOKENS,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    # (cache, new tokens): the cached run at the full length, and both at the uncached length for the speed-up
    plan = [(True, new_tokens)]
    if uncached_tokens:  # 0: the cached runs only
        plan += [(True, uncached_tokens)] if uncached_tokens != new_tokens else []
        plan.append((False, uncached_tokens))
    seconds: dict[tuple[str, bool, int], float] = {}
    for cache, count in plan:
        for position in POSITIONS:
            seconds[position, cache, count] = timed(models[position], prompt, count, cache)
            print(f"{size:5} {position:5} {'cached' if cache else 'uncached':9} {count:5} new tokens "
                  f"{seconds[position, cache, count]:9.2f} s {count / seconds[position, cache, count]:9.1f} tokens/s",
                  flush=True)
    for position in POSITIONS if uncached_tokens else ():
        speedup = seconds[position, False, uncached_tokens] / seconds[position, True, uncached_tokens]
        print(f"{size}: {position} cached/uncached speed-up at {uncached_tokens} new tokens: {speedup:.1f}x")
    for cache, count in plan:
        ratio = seconds["pope", cache, count] / seconds["rope", cache, count]
        print(f"{size}: PoPE/RoPE time, {'cached' if cache else 'uncached'}, {count} new tokens: {ratio:.3f}")


def parse_counts(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,124m")
    parser.add_argument("--new-tokens", type=int, default=1024, help="new tokens with the cache")
    parser.add_argument("--uncached-tokens", default="tiny=1024,124m=256",
                        help="new tokens without the cache, per size (0: skip the uncached runs)")
    args = parser.parse_args()
    uncached = parse_counts(args.uncached_tokens)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, greedy, prompt {PROMPT_TOKENS} tokens")
    for size in args.sizes.split(","):
        bench_size(size, args.new_tokens, uncached.get(size, args.new_tokens))


if __name__ == "__main__":
    main()
