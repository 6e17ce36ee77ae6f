"""Attention alone, forward + backward: PoPE reference (SDPA), PoPE fused (Triton), RoPE (SDPA), side by side.

    python bench/attention.py [--lengths 1024,2048,4096] [--heads 12] [--head-dim 64] [--batch 1] [--reps 5]
                              [--device cpu|cuda] [--dtype fp32|bf16|fp16]

Each implementation takes raw q, k, v (batch, heads, L, head_dim) and δ, applies its position encoding and causal
attention, and backpropagates a random output gradient; the three alternate rep by rep so they see the same machine
state, and the median time is printed with the ratios to RoPE. Peak memory is what the encoding and attention
allocate beyond the inputs: on CUDA torch.cuda.max_memory_allocated; on CPU (Linux) the peak resident set of a fresh
process during one step, above its resident set before it (coarser: allocator slack, page granularity). RoPE
uses SDPA's flash backend where it can (CUDA with fp16/bf16; the CPU flash kernel). The fused kernel needs a GPU: on CPU it would run in Triton's
interpreter, which is a correctness tool and not a benchmark, so it is reported as not run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.model import causal_attention  # noqa: E402
from pipeline.positional import PoPE, RoPE  # noqa: E402

IMPLS = ("pope_sdpa", "pope_fused", "rope_sdpa")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_step(impl: str, batch: int, heads: int, seq: int, dim: int, device: torch.device,
              dtype: torch.dtype) -> Callable[[], None]:
    """One forward + backward of `impl` on fresh random inputs (made once)."""
    gen = torch.Generator().manual_seed(seq)
    q, k, v, grad = (torch.randn(batch, heads, seq, dim, generator=gen).to(device, dtype) for _ in range(4))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    positions = torch.arange(seq, device=device)
    scale = 1.0 / math.sqrt(dim)
    if impl.startswith("pope"):
        encoding = PoPE(dim, heads, delta_init="uniform").to(device)
    else:
        encoding = RoPE(dim).to(device)
    if impl == "pope_fused":
        from pipeline.kernels.pope_attention import pope_attention

        def forward() -> torch.Tensor:
            pos, theta, delta = encoding(q, k, positions, fused_inputs=True)
            return pope_attention(q, k, v, theta, delta, pos, scale, encoding.magnitude)
    else:
        def forward() -> torch.Tensor:
            q2, k2 = encoding(q, k, positions)
            return causal_attention(q2, k2, v, scale)

    def step() -> None:
        forward().backward(grad)
        q.grad = k.grad = v.grad = None
        for p in encoding.parameters():
            p.grad = None
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cuda_peak_mib(step: Callable[[], None], device: torch.device) -> float:
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def cpu_peak_mib(impl: str, args: argparse.Namespace, seq: int) -> float:
    """Peak RSS growth of a fresh process running one step of `impl` (see --child)."""
    out = subprocess.run([sys.executable, __file__, "--child", impl, "--lengths", str(seq), "--heads", str(args.heads),
                          "--head-dim", str(args.head_dim), "--batch", str(args.batch), "--dtype", args.dtype,
                          "--device", "cpu"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def child(args: argparse.Namespace) -> None:
    step = make_step(args.child, args.batch, args.heads, int(args.lengths), args.head_dim, torch.device("cpu"),
                     DTYPES[args.dtype])
    # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one (VmRSS)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    step()
    print(json.dumps({"peak_mib": (_status_kib("VmHWM") - before) / 1024}))


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    impls = list(IMPLS)
    if device.type != "cuda":
        impls.remove("pope_fused")
        print("pope_fused: not run on CPU (Triton kernels need a GPU; the CPU interpreter is for tests, not timing)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}), {torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}, "
          f"batch {args.batch}, {args.heads} heads, head_dim {args.head_dim}, median of {args.reps} fwd+bwd")
    header = f"{'L':>6}" + "".join(f"{i + ' ms':>16}" for i in impls) + "".join(f"{i + ' MiB':>17}" for i in impls)
    header += "".join(f"{i + '/rope t':>17}" for i in impls if i != "rope_sdpa")
    header += "".join(f"{i + '/rope mem':>19}" for i in impls if i != "rope_sdpa")
    print(header, flush=True)
    for seq in (int(x) for x in args.lengths.split(",")):
        steps = {i: make_step(i, args.batch, args.heads, seq, args.head_dim, device, dtype) for i in impls}
        times: dict[str, list[float]] = {i: [] for i in impls}
        for rep in range(args.reps + 1):  # rep 0 warms up (allocations, kernel compilation) and is not counted
            for impl in impls if rep % 2 == 0 else reversed(impls):
                sync(device)
                start = time.perf_counter()
                steps[impl]()
                sync(device)
                if rep:
                    times[impl].append(time.perf_counter() - start)
        ms = {i: 1000 * statistics.median(times[i]) for i in impls}
        mem = {i: cuda_peak_mib(steps[i], device) if device.type == "cuda" else cpu_peak_mib(i, args, seq)
               for i in impls}
        row = f"{seq:>6}" + "".join(f"{ms[i]:>16.1f}" for i in impls) + "".join(f"{mem[i]:>17.1f}" for i in impls)
        row += "".join(f"{ms[i] / ms['rope_sdpa']:>17.3f}" for i in impls if i != "rope_sdpa")
        row += "".join(f"{mem[i] / mem['rope_sdpa']:>19.3f}" if mem["rope_sdpa"] >= 1 else f"{'n/a':>19}"
                       for i in impls if i != "rope_sdpa")
        print(row, flush=True)


if __name__ == "__main__":
    main()
