"""What a run reports: TensorBoard scalars and a JSON-lines log (rank 0 only), throughput and MFU.

TensorBoard tags (kept stable; other tools read them): train/loss, train/lr, train/grad_norm, train/tokens_per_s,
train/mfu (when the accelerator's peak is known), val/loss, val/ppl; for PoPE runs, at every evaluation,
delta/layer_NN (each layer's clamped δ as a heads × frequencies heatmap image and as a histogram). After a resume the writer is opened with
purge_step = the first step to run, so events a killed run logged after its last checkpoint are dropped and the
curves continue without duplicated steps. `metrics.jsonl` holds every step's loss as written (and its exact
float.hex()), for scripts and for the resume-exactness test.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch

from pipeline.run import RunFolder

# Dense (not 2:4 sparse) bf16 tensor-core peak (TFLOP/s) by a fragment of the device name, for MFU when
# logging.peak_tflops is 0; the first fragment found in the name wins, so variants come before their family.
# NVIDIA's datasheets: H100 SXM 989, H100 PCIe 756 (its name says "PCIe"; the SXM part reads "H100 80GB HBM3"),
# H200 SXM 989, A100 312 (SXM and PCIe alike). NVL variants: peak not confirmed here, so 0 (unknown): set
# logging.peak_tflops rather than report MFU against the wrong peak.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 NVL", 0.0), ("H200 NVL", 0.0), ("H100 PCIE", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0),
    ("A10G", 125.0), ("L4", 121.0), ("V100", 125.0),
)


def peak_tflops_for(device_name: str) -> float:
    """The dense bf16 peak of the GPU called `device_name` (case-insensitive), 0 when unknown."""
    name = device_name.upper()
    return next((peak for key, peak in PEAK_TFLOPS if key in name), 0.0)


def detect_peak_tflops() -> float:
    """The bf16 peak of this process's GPU by name, 0 when unknown (CPU)."""
    if not torch.cuda.is_available():
        return 0.0
    return peak_tflops_for(torch.cuda.get_device_name())


class Metrics:
    """RUN/tb and RUN/metrics.jsonl of a run (written by rank 0: `enabled`), from `start_step` on."""

    def __init__(self, run: RunFolder, enabled: bool, tensorboard: bool, start_step: int) -> None:
        self.enabled = enabled
        self.writer = None
        self.log = None
        if enabled:
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(run.tb), purge_step=start_step + 1)
            self.log = open(run.metrics, "a")

    def scalars(self, step: int, values: dict[str, float], to_tensorboard: bool = True) -> None:
        if not self.enabled:
            return
        if self.writer is not None and to_tensorboard:
            for tag, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):  # not data/sample_digest
                    self.writer.add_scalar(tag, value, step)
        record: dict[str, Any] = {"step": step, "time": round(time.time(), 3), **values}
        if "train/loss" in values:
            record["train/loss_hex"] = float(values["train/loss"]).hex()
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()

    def delta_figures(self, step: int, model: torch.nn.Module) -> None:
        """What PoPE learned: each layer's δ, clamped to [-2π, 0] as the forward pass uses it, as a heatmap image
        (heads × frequencies, like the paper's appendix C; `delta/layer_NN`) and a histogram (`delta/layer_NN`).

        Every rank must call this: under ZeRO-3 each rank holds a shard of δ, and gathering the full tensors is a
        collective (deepspeed.zero.GatheredParameters); ZeRO 0-2 hold full parameters and nothing is gathered.
        Only rank 0 (enabled, with a TensorBoard writer) draws and writes. Runs without PoPE, or with
        model.pope_delta=none, have no δ.
        """
        from pipeline.positional import TWO_PI, PoPE

        encodings = [m for m in model.modules() if isinstance(m, PoPE) and m.delta is not None]
        if not encodings:
            return
        deltas = [m.delta for m in encodings]
        partitioned = any(hasattr(p, "ds_id") for p in deltas)  # ZeRO-3 marks the parameters it partitions
        if partitioned:
            import deepspeed

            with deepspeed.zero.GatheredParameters(deltas, modifier_rank=None):
                values = [d.detach().float().clamp(-TWO_PI, 0.0).cpu() for d in deltas]
        else:
            values = [d.detach().float().clamp(-TWO_PI, 0.0).cpu() for d in deltas]
        if self.writer is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for layer, value in enumerate(values):
            tag = f"delta/layer_{layer:02d}"
            self.writer.add_histogram(tag, value.flatten(), step)
            heads, freqs = value.shape
            fig, ax = plt.subplots(figsize=(min(12.0, 2.0 + freqs / 10), 1.2 + 0.3 * heads))
            image = ax.imshow(value.numpy(), aspect="auto", cmap="viridis", vmin=-TWO_PI, vmax=0.0,
                              interpolation="nearest")
            ax.set_xlabel("frequency c (θ_c = base^(-c/d))")
            ax.set_ylabel("head")
            ax.set_title(f"δ, layer {layer}, step {step}")
            fig.colorbar(image, ax=ax, label="δ (rad)")
            fig.tight_layout()
            self.writer.add_figure(tag, fig, step)  # closes the figure

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
