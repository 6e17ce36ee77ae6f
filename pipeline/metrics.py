"""What a run reports: TensorBoard scalars and a JSON-lines log (rank 0 only), throughput and MFU.

TensorBoard tags (kept stable; other tools read them): train/loss, train/lr, train/grad_norm, train/tokens_per_s,
train/mfu (when the accelerator's peak is known), val/loss, val/ppl. After a resume the writer is opened with
purge_step = the first step to run, so events a killed run logged after its last checkpoint are dropped and the
curves continue without duplicated steps. `metrics.jsonl` holds every step's loss as written (and its exact
float.hex()), for scripts and for the resume-exactness test.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak of common accelerators (TFLOP/s), for MFU when logging.peak_tflops is 0.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0}


def detect_peak_tflops() -> float:
    """The bf16 peak of this process's GPU by name, 0 when unknown (CPU)."""
    if not torch.cuda.is_available():
        return 0.0
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), 0.0)


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_step: int) -> None:
        self.enabled = enabled
        self.writer = None
        self.log = None
        if enabled:
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1)
            self.log = open(run_dir / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float], to_tensorboard: bool = True) -> None:
        if not self.enabled:
            return
        if self.writer is not None and to_tensorboard:
            for tag, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)
        record: dict[str, Any] = {"step": step, "time": round(time.time(), 3), **values}
        if "train/loss" in values:
            record["train/loss_hex"] = float(values["train/loss"]).hex()
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.log is not None:
            self.log.close()


class Throughput:
    """Tokens per second over the steps since the last report."""

    def __init__(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def report(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.start, self.tokens = now, 0
        return rate
