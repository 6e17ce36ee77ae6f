"""The fused PoPE attention kernel (pipeline/kernels) against the reference path: PoPE's float32 encoding
(pipeline/positional.py) then causal_attention (pipeline/model.py) in float64.

Without a GPU the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 must be set before the kernel module
is imported (triton.jit reads it when decorating), so this module sets it at import, and tiny shapes keep it fast.
bf16 runs on a GPU only (the interpreter's bf16 dot products are wrong, triton #11584). On a GPU the same tests run
natively at full size (bench/gpu_check.sh). Errors are normwise: max|fused − reference| / max|reference| per tensor.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="Triton is not installed (the dev extra has it on Linux)")

from pipeline import kernels  # noqa: E402
from pipeline.config import ConfigError, Config, ModelConfig, apply_overrides, model_config_from_dict, \
    model_identity, validate  # noqa: E402
from pipeline.kernels.pope_attention import _interpreted, pope_attention  # noqa: E402
from pipeline.model import Transformer, causal_attention  # noqa: E402
from pipeline.positional import PoPE  # noqa: E402

if not CUDA and not _interpreted():
    pytest.skip("the kernel module was imported before TRITON_INTERPRET=1 was set and there is no GPU",
                allow_module_level=True)

DEVICE = torch.device("cuda" if CUDA else "cpu")
# Block size 32 under the interpreter, 64 on GPUs: the first length of each pair is a multiple, the second not.
SEQS = (1024, 1000) if CUDA else (64, 80)
BATCH, HEADS = (2, 12) if CUDA else (1, 2)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def compare(dim: int, seq: int, dtype: torch.dtype, magnitude: str = "softplus", delta: str = "learned",
            start: int = 0, batch_positions: bool = False, batch: int = BATCH) -> dict[str, float]:
    """Forward and gradients (q, k, v, δ) of the fused kernel and the reference on fresh random inputs; returns
    each one's relative error. δ is drawn from U(-7, 0.5), so some entries sit outside the clamp range [-2π, 0]."""
    gen = torch.Generator().manual_seed(1000 * dim + seq + start)
    q, k, v, grad = (torch.randn(batch, HEADS, seq, dim, generator=gen).to(DEVICE, dtype) for _ in range(4))
    encoding = PoPE(dim, HEADS, magnitude=magnitude, delta=delta).to(DEVICE)
    if encoding.delta is not None:
        with torch.no_grad():
            encoding.delta.copy_(torch.rand(HEADS, dim, generator=gen) * 7.5 - 7.0)
    if batch_positions:  # (batch, seq): each sequence at its own offset
        positions = torch.stack([torch.arange(seq) + start + 37 * b for b in range(batch)]).to(DEVICE)
    else:
        positions = (torch.arange(seq) + start).to(DEVICE)
    scale = 1.0 / math.sqrt(dim)

    # reference: the float32 encoding (the project's phases), attention in float64
    ref = [t.float().detach().requires_grad_() for t in (q, k, v)]
    q2, k2 = encoding(ref[0], ref[1], positions)
    out_ref = causal_attention(q2.double(), k2.double(), ref[2].double(), scale)
    out_ref.backward(grad.double())
    want = {"out": out_ref, "dq": ref[0].grad, "dk": ref[1].grad, "dv": ref[2].grad}
    if encoding.delta is not None:
        want["ddelta"], encoding.delta.grad = encoding.delta.grad, None

    fused = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    pos, theta, clamped = encoding(fused[0], fused[1], positions, fused_inputs=True)
    out = pope_attention(*fused, theta, clamped, pos, scale, magnitude)
    assert out.dtype == dtype and out.shape == q.shape
    out.backward(grad)
    got = {"out": out, "dq": fused[0].grad, "dk": fused[1].grad, "dv": fused[2].grad}
    if encoding.delta is not None:
        got["ddelta"] = encoding.delta.grad
    for name, value in want.items():
        assert value.abs().max() > 0, f"{name} of the reference is all zeros: the comparison would prove nothing"
    return {name: relative_error(got[name], want[name]) for name in want}


def check(errors: dict[str, float], dtype: torch.dtype) -> None:
    bad = {name: err for name, err in errors.items() if not err <= TOLERANCE[dtype]}
    assert not bad, f"relative errors above {TOLERANCE[dtype]:g}: {bad} (all: {errors})"


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("dim", (32, 64, 128))
def test_fp32_forward_and_gradients(dim, seq):
    check(compare(dim, seq, torch.float32), torch.float32)


@pytest.mark.parametrize("dim,seq", [(32, SEQS[0]), (64, SEQS[1]), (128, SEQS[1])])
def test_fp16_forward_and_gradients(dim, seq):
    check(compare(dim, seq, torch.float16), torch.float16)


@pytest.mark.parametrize("dim,seq", [(64, SEQS[0]), (128, SEQS[1])])
def test_bf16_forward_and_gradients(dim, seq):
    if not CUDA:
        pytest.skip("bf16 only on a GPU: the Triton interpreter's bf16 dot products are wrong (triton #11584)")
    check(compare(dim, seq, torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("magnitude,delta", [("relu", "learned"), ("identity", "learned"), ("softplus", "none")])
def test_ablations(magnitude, delta):
    check(compare(32, SEQS[1], torch.float32, magnitude=magnitude, delta=delta), torch.float32)


def test_positions_with_offset_and_per_batch():
    """Positions past 2000 (the angle reduction matters) and a (batch, seq) positions tensor."""
    check(compare(32, SEQS[1], torch.float32, start=2000, batch_positions=True, batch=2), torch.float32)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=64, n_heads=2, n_layers=2, max_seq_len=64, pope_delta_init="uniform",
                       **overrides)


def test_model_fused_equals_sdpa():
    """The whole model, attention_impl fused vs sdpa, same weights: loss and every parameter's gradient."""
    torch.manual_seed(0)
    models = {impl: Transformer(tiny_config(attention_impl=impl)).to(DEVICE) for impl in ("sdpa", "fused")}
    models["fused"].load_state_dict(models["sdpa"].state_dict())
    tokens = torch.randint(0, 64, (2, SEQS[1] // 2 + 1), device=DEVICE)
    grads, losses = {}, {}
    for impl, model in models.items():
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses[impl] = loss.item()
        grads[impl] = {name: p.grad for name, p in model.named_parameters()}
    assert abs(losses["fused"] - losses["sdpa"]) <= 1e-5 * abs(losses["sdpa"])
    errors = {name: relative_error(grads["fused"][name], grads["sdpa"][name]) for name in grads["sdpa"]}
    assert any(".delta" in name for name in errors) and max(errors.values()) <= 1e-4, errors


def test_fused_refuses_what_it_cannot_run(monkeypatch):
    model = Transformer(tiny_config(attention_impl="fused"))
    tokens = torch.randint(0, 64, (1, 9))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="model.attention_impl=fused cannot run: it needs a CUDA device"):
        model(tokens)
    # auto on a CPU never takes the interpreter: the reference path, no error
    auto = Transformer(tiny_config(attention_impl="auto"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not auto.blocks[0].attn.use_fused(torch.zeros(1, 2, 9, 32))
    # attention dropout while training: fused refuses, auto falls back
    q = torch.zeros(1, 2, 9, 32, device=DEVICE)
    assert kernels.fused_unsupported(q, dropout_active=True, allow_interpreter=True) is not None


@pytest.mark.parametrize("override,message", [
    ("model.position=rope", "fused is a PoPE kernel"),
    ("model.dropout=0.1", "fused has no attention dropout"),
    ("model.d_model=96", "power-of-two head dim"),
])
def test_config_refuses_fused(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(Config(), ["model.attention_impl=fused", override]))


def test_attention_impl_is_not_part_of_a_runs_identity():
    """A run resumes under another attention_impl, and checkpoints written before the key existed still match."""
    old_record = model_identity(ModelConfig())
    assert "attention_impl" not in old_record
    for impl in ("sdpa", "fused", "auto"):
        assert model_identity(ModelConfig(attention_impl=impl)) == model_identity(model_config_from_dict(old_record))
