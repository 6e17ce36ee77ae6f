"""Attention through SDPA (with PoPE's zero-padded v) against a naive softmax(QKᵀ·scale)V, values and gradients."""

import math

import pytest
import torch
from torch.func import functional_call

from pipeline.model import causal_attention
from pipeline.positional import PoPE, build_qk_encoding

TWO_PI = 2 * math.pi


def naive_causal_attention(q, k, v, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    seq = q.shape[-2]
    mask = torch.ones(seq, seq, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def _inputs(seed=0, batch=2, heads=2, seq=6, dim=4):
    gen = torch.Generator().manual_seed(seed)
    make = lambda: torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64, requires_grad=True)
    return make(), make(), make()


@pytest.mark.parametrize("kind", ["pope", "rope", "none"])
def test_sdpa_equals_naive_attention(kind):
    q, k, v = _inputs()
    enc = build_qk_encoding(kind, 4, 2, delta_init="uniform").double()
    positions = torch.arange(10, 16)
    q2, k2 = enc(q, k, positions)
    scale = 1 / math.sqrt(4)  # the original head dim, for every encoding
    got = causal_attention(q2, k2, v, scale)
    want = naive_causal_attention(q2, k2, v, scale)
    assert got.shape == v.shape
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    grads_got = torch.autograd.grad(got.pow(2).sum(), (q, k, v), retain_graph=True)
    grads_want = torch.autograd.grad(want.pow(2).sum(), (q, k, v))
    for a, b in zip(grads_got, grads_want):
        assert torch.allclose(a, b, rtol=0, atol=1e-10)


def test_pope_attention_gradcheck_q_k_v_delta():
    q, k, v = _inputs(seq=5)
    pope = PoPE(4, 2).double()
    delta = torch.empty(2, 4, dtype=torch.float64).uniform_(-TWO_PI + 0.1, -0.1).requires_grad_()
    positions = torch.tensor([0, 3, 4, 9, 20])

    def attend(q, k, v, delta):
        q2, k2 = functional_call(pope, {"delta": delta}, (q, k, positions))
        return causal_attention(q2, k2, v, 0.5)

    assert torch.autograd.gradcheck(attend, (q, k, v, delta), eps=1e-6, atol=1e-7)

    def attend_naive(q, k, v, delta):
        q2, k2 = functional_call(pope, {"delta": delta}, (q, k, positions))
        return naive_causal_attention(q2, k2, v, 0.5)

    assert torch.allclose(attend(q, k, v, delta), attend_naive(q, k, v, delta), atol=1e-12)


def test_rope_attention_gradcheck():
    q, k, v = _inputs(seq=5)
    rope = build_qk_encoding("rope", 4, 2).double()
    positions = torch.arange(5)

    def attend(q, k, v):
        return causal_attention(*rope(q, k, positions), v, 0.5)

    assert torch.autograd.gradcheck(attend, (q, k, v), eps=1e-6, atol=1e-7)


def test_alibi_bias_attention_equals_naive_with_bias():
    """ALiBi's float mask (bias + causal −inf) through SDPA, against the naive softmax with the bias added."""
    q, k, v = _inputs(heads=3, seq=7)
    alibi = build_qk_encoding("alibi", 4, 3)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [2, 5, 6, 9, 10, 11, 30]])
    bias = alibi.bias(positions, positions, torch.float64)
    assert bias.shape == (2, 3, 7, 7)
    # Press et al. for 3 heads: the 2-head slopes 2^-4, 2^-8, then 2^-2 (the 4-head sequence's first)
    slopes = torch.tensor([2 ** -4, 2 ** -8, 2 ** -2], dtype=torch.float64)
    distance = (positions[:, :, None] - positions[:, None, :]).double()
    torch.testing.assert_close(bias, -slopes[None, :, None, None] * distance[:, None], rtol=0, atol=0)

    def naive(q, k, v):
        scores = (q @ k.transpose(-1, -2)) * 0.5 + bias
        mask = torch.ones(7, 7, dtype=torch.bool).tril()
        return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v

    got = causal_attention(q, k, v, 0.5, bias=bias)
    torch.testing.assert_close(got, naive(q, k, v), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda q, k, v: causal_attention(q, k, v, 0.5, bias=bias), (q, k, v),
                                    eps=1e-6, atol=1e-7)
