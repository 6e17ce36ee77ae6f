"""Training step time of PoPE against RoPE, side by side, and the data loader against what the model consumes.

    python bench/train_step.py [--sizes tiny,124m] [--steps 3] [--device cpu|cuda] [--dtype fp32|bf16]
                               [--micro-batch N] [--attention-impl auto|sdpa|fused] [--peak-tflops X]

For each size, a PoPE model and its RoPE twin (identical but for the position encoding) take alternating
optimizer steps (forward, backward, AdamW) on the same random batch, so both see the same machine state; the
median step time of each and their ratio are printed. The step is the model's own work in one process: DeepSpeed's
wrapping adds the same cost to both. Then a StreamingDataLoader reads a dataset made by `prep_text` and its
samples/s is compared with the samples/s the 124M model consumes. Goal on CPU: PoPE/RoPE step time <= 1.15.
On a GPU each model's MFU is printed too: the model's training FLOPs per token (Transformer.flops_per_token) times
tokens/s over the device's dense bf16 peak (pipeline/metrics.py, by device name, or --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.metrics import detect_peak_tflops  # noqa: E402
from pipeline.model import Transformer  # noqa: E402

SIZES = {  # name: (model, micro-batch, seq_len)
    "tiny": (dict(vocab_size=320, d_model=64, n_heads=4, n_layers=2, max_seq_len=128), 8, 128),
    "124m": (dict(vocab_size=50257, d_model=768, n_heads=12, n_layers=12, max_seq_len=1024), 1, 1024),
}


def step_times(size: str, steps: int, device: torch.device, dtype: torch.dtype, batch: int,
               attention_impl: str) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Step times of PoPE and RoPE, and their (equal but for attention) training FLOPs per token."""
    shape, _, seq = SIZES[size]
    models, optimizers = {}, {}
    for position in ("pope", "rope"):
        torch.manual_seed(0)
        impl = attention_impl if position == "pope" else "sdpa"
        models[position] = Transformer(ModelConfig(**shape, position=position, attention_impl=impl)).to(device)
        optimizers[position] = torch.optim.AdamW(models[position].parameters(), lr=1e-4)
    tokens = torch.randint(0, shape["vocab_size"], (batch, seq + 1), device=device)
    times: dict[str, list[float]] = {"pope": [], "rope": []}
    for step in range(steps + 1):  # step 0 warms up (allocations, kernel selection) and is not counted
        for position in ("pope", "rope") if step % 2 == 0 else ("rope", "pope"):
            model, optimizer = models[position], optimizers[position]
            _sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
            if step:
                times[position].append(time.perf_counter() - start)
    return times, {p: m.flops_per_token(seq) for p, m in models.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_samples_per_second(seq_len: int, seconds: float = 5.0) -> tuple[float, int]:
    """samples/s of a StreamingDataLoader (1 process, 1 worker, micro-batch 8) over a prep_text dataset."""
    from data_prep.parallel import PrepOptions
    from data_prep.text import prep_text
    from pipeline.config import Config, apply_overrides
    from pipeline.data import BatchMaker, make_loader, open_dataset

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from conftest import synthetic_documents

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in synthetic_documents(3000, 0)))
        prep_text([root / "d.jsonl"], root / "data", vocab_size=500, val_fraction=0.01, seq_len=seq_len,
                  options=PrepOptions(workers=2, progress=False))
        config = apply_overrides(Config(), [f"data.path={root / 'data'}", f"data.seq_len={seq_len}", "model.vocab_size=0",
                                            "data.micro_batch_size=8", "data.num_workers=1"])
        dataset = open_dataset(config)
        make = BatchMaker(config, dataset)
        loader = make_loader(dataset, config.data, "train", train=True)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for batch in loader:
                make(batch["tokens"])  # what the training process does with each batch
                count += len(batch["tokens"])
                if time.perf_counter() - start >= seconds:
                    break
        return count / (time.perf_counter() - start), dataset.manifest["splits"]["train"]["samples"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,124m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--micro-batch", type=int, default=0, help="sequences per step (0: the size's default)")
    parser.add_argument("--attention-impl", choices=["auto", "sdpa", "fused"], default="auto",
                        help="PoPE's model.attention_impl (RoPE always uses sdpa)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="0: by device name (GPUs only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}, "
          f"PoPE attention_impl={args.attention_impl}")
    peak = args.peak_tflops or (detect_peak_tflops() if device.type == "cuda" else 0.0)
    print(f"{'size':<6}{'batch x seq':>12}{'PoPE s/step':>13}{'RoPE s/step':>13}{'PoPE tok/s':>12}"
          f"{'RoPE tok/s':>12}{'PoPE/RoPE':>11}" + (f"{'PoPE MFU':>10}{'RoPE MFU':>10}" if peak else ""))
    consumed = None
    for size in args.sizes.split(","):
        _, default_batch, seq = SIZES[size]
        batch = args.micro_batch or default_batch
        times, flops = step_times(size, args.steps, device, dtype, batch, args.attention_impl)
        pope, rope = statistics.median(times["pope"]), statistics.median(times["rope"])
        mfu = (f"{flops['pope'] * batch * seq / pope / (peak * 1e12):>10.1%}"
               f"{flops['rope'] * batch * seq / rope / (peak * 1e12):>10.1%}") if peak else ""
        print(f"{size:<6}{f'{batch} x {seq}':>12}{pope:>13.4f}{rope:>13.4f}{batch * seq / pope:>12,.0f}"
              f"{batch * seq / rope:>12,.0f}{pope / rope:>11.3f}{mfu}", flush=True)
        if size == "124m":
            consumed = batch / pope
    if consumed is not None:
        rate, samples = loader_samples_per_second(1024)
        print(f"data loader: {rate:,.0f} samples/s (1 worker, seq 1024, {samples:,} samples) vs "
              f"{consumed:,.3f} samples/s consumed by the 124M PoPE step: {rate / consumed:,.0f}x headroom")


if __name__ == "__main__":
    main()
