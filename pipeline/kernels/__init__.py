"""Fused kernels (Triton) and the rule for when the model uses them.

`fused_pope_attention` (pipeline/kernels/pope_attention.py) imports its module lazily: Triton is optional
(Linux, dev extra), and importing it decides, once, whether its kernels compile for a GPU or run in the CPU interpreter
(TRITON_INTERPRET=1 at import time).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on the CPU through its interpreter (tests only: it is slow)."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def fused_unsupported(q: torch.Tensor, dropout_active: bool, allow_interpreter: bool) -> str | None:
    """Why fused PoPE attention cannot take these queries, or None when it can.

    The config has already checked what does not depend on the run (PoPE, a power-of-two head_dim >= 16); this
    covers the rest: Triton present, a CUDA tensor (or, with allow_interpreter, a CPU one under TRITON_INTERPRET=1),
    fp32/fp16/bf16, and no attention dropout (the kernel has none)."""
    if not triton_available():
        return "Triton is not installed (pip install triton; Linux only)"
    if q.device.type != "cuda" and not (allow_interpreter and q.device.type == "cpu" and interpreter_enabled()):
        return f"it needs a CUDA device (or TRITON_INTERPRET=1 on CPU, for tests); the model is on {q.device.type}"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"it takes fp32, fp16 or bf16; the model runs in {q.dtype}"
    dim = q.shape[-1]
    if dim < 16 or dim & (dim - 1):
        return f"it needs a power-of-two head_dim >= 16; got {dim}"
    if dropout_active:
        return "it has no attention dropout (set model.dropout=0, or use sdpa)"
    return None


def fused_pope_attention(*args, **kwargs) -> torch.Tensor:
    """pipeline.kernels.pope_attention.pope_attention, importing Triton on first use. (Not named pope_attention:
    importing the submodule of that name would replace this attribute of the package.)"""
    from pipeline.kernels.pope_attention import pope_attention as fused

    return fused(*args, **kwargs)
