"""MFU's peak table tells the GPUs apart by their device names (as torch.cuda.get_device_name prints them)."""

from __future__ import annotations

import pytest

from pipeline.metrics import peak_tflops_for


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),  # SXM
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 0.0),  # peak not confirmed: unknown rather than wrong
    ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-PCIE-40GB", 312.0),
    ("Tesla T4", 0.0),
])
def test_peak_by_device_name(name, peak):
    assert peak_tflops_for(name) == peak
