"""PoPE and RoPE against their definitions, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.positional import NoPE, PoPE, RoPE, build_qk_encoding, frequencies, qk_width

TWO_PI = 2 * math.pi


def pope_logits_reference(q, k, delta, positions, base=10000.0):
    """Σ_c softplus(q[t,c]) softplus(k[s,c]) cos((p_s − p_t)θ_c + δ_c), written out with loops over t and s."""
    batch, heads, seq, dim = q.shape
    theta = torch.tensor([base ** (-c / dim) for c in range(dim)], dtype=torch.float64)
    delta = delta.clamp(-TWO_PI, 0.0)
    pos = positions.expand(batch, seq) if positions.dim() == 1 else positions
    out = torch.empty(batch, heads, seq, seq, dtype=torch.float64)
    mq, mk = F.softplus(q), F.softplus(k)
    for b in range(batch):
        for h in range(heads):
            for t in range(seq):
                for s in range(seq):
                    phase = (pos[b, s] - pos[b, t]).double() * theta + delta[h]
                    out[b, h, t, s] = (mq[b, h, t] * mk[b, h, s] * torch.cos(phase)).sum()
    return out


def _qk(batch=2, heads=3, seq=7, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, heads, seq, dim, generator=gen, dtype=torch.float64)
    return q, k


@pytest.mark.parametrize("positions_shape", ["1d", "2d"])
def test_pope_logits_match_formula(positions_shape):
    q, k = _qk()
    pope = PoPE(head_dim=8, n_heads=3).double()
    with torch.no_grad():
        pope.delta.uniform_(-TWO_PI, 0.0)
    gen = torch.Generator().manual_seed(1)
    if positions_shape == "1d":
        positions = torch.randint(0, 5000, (7,), generator=gen)
    else:
        positions = torch.randint(0, 5000, (2, 7), generator=gen)
    q2, k2 = pope(q, k, positions)
    assert q2.shape == (2, 3, 7, 16) and k2.shape == (2, 3, 7, 16)
    got = q2 @ k2.transpose(-1, -2)
    want = pope_logits_reference(q, k, pope.delta.detach(), positions)
    assert torch.allclose(got, want, rtol=0, atol=1e-9), (got - want).abs().max()


def test_pope_frequencies_are_d_not_d_over_2():
    theta = frequencies(64, 1, 64, 10000.0, torch.device("cpu"), torch.float64)
    rope_theta = frequencies(32, 2, 64, 10000.0, torch.device("cpu"), torch.float64)
    assert theta.shape == (64,) and theta[0] == 1.0
    assert torch.allclose(theta[1], torch.tensor(10000.0 ** (-1 / 64), dtype=torch.float64))
    assert torch.allclose(theta[::2], rope_theta)  # PoPE's d frequencies contain RoPE's d/2
    assert qk_width("pope", 64) == 128 and qk_width("rope", 64) == 64


def test_pope_delta_clamped_to_minus_two_pi_zero():
    q, k = _qk()
    positions = torch.arange(7)
    pope = PoPE(8, 3).double()

    def logits(value):
        with torch.no_grad():
            pope.delta.fill_(value)
        q2, k2 = pope(q, k, positions)
        return q2 @ k2.transpose(-1, -2)

    assert torch.equal(logits(1.0), logits(0.0))
    assert torch.equal(logits(-10.0), logits(-TWO_PI))
    assert not torch.allclose(logits(-1.0), logits(0.0))


def test_pope_delta_gradient_flows_from_zero_init_not_from_outside():
    q, k = _qk()
    positions = torch.arange(7)
    for value, expect_grad in [(0.0, True), (-1.0, True), (0.5, False), (-7.0, False)]:
        pope = PoPE(8, 3).double()
        with torch.no_grad():
            pope.delta.fill_(value)
        q2, k2 = pope(q, k, positions)
        (q2 @ k2.transpose(-1, -2)).pow(2).sum().backward()
        assert (pope.delta.grad.abs().sum() > 0) == expect_grad, value


def test_pope_delta_init():
    torch.manual_seed(0)
    zero, uniform = PoPE(16, 4, delta_init="zero"), PoPE(16, 4, delta_init="uniform")
    assert zero.delta.shape == (4, 16) and torch.all(zero.delta == 0)
    assert torch.all(uniform.delta >= -TWO_PI) and torch.all(uniform.delta <= 0)
    assert uniform.delta.std() > 1.0  # spread over the range, not a constant
    with pytest.raises(ValueError, match="delta_init"):
        PoPE(16, 4, delta_init="normal")


@pytest.mark.parametrize("kind", ["pope", "rope"])
def test_shifting_all_positions_leaves_logits_unchanged(kind):
    q, k = _qk()
    module = build_qk_encoding(kind, 8, 3).double()
    if kind == "pope":
        with torch.no_grad():
            module.delta.uniform_(-TWO_PI, 0.0)
    positions = torch.arange(7)

    def logits(pos):
        q2, k2 = module(q, k, pos)
        return q2 @ k2.transpose(-1, -2)

    base = logits(positions)
    for shift in (1, 37, 1000):
        assert torch.allclose(logits(positions + shift), base, rtol=0, atol=1e-9)


def test_rope_preserves_norms_and_equal_positions_give_dot_product():
    q, k = _qk()
    rope = RoPE(8)
    positions = torch.randint(0, 3000, (7,))
    q2, k2 = rope(q, k, positions)
    assert torch.allclose(q2.norm(dim=-1), q.norm(dim=-1), atol=1e-12)
    assert torch.allclose(k2.norm(dim=-1), k.norm(dim=-1), atol=1e-12)
    same = torch.full((7,), 1234)
    q3, k3 = rope(q, k, same)
    assert torch.allclose(q3 @ k3.transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-10)
    # and at different positions it is not the plain dot product
    assert not torch.allclose(q2 @ k2.transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-3)


def test_rope_is_relative_rotation():
    """⟨R(p)q, R(p')k⟩ depends on p' − p only: the 2-D pair (c, c + d/2) is rotated by p·θ_c."""
    rope = RoPE(4, base=100.0)
    q = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]], dtype=torch.float64)
    q2, _ = rope(q, q, torch.tensor([3]))
    angle = 3 * 1.0  # θ_0 = 1
    assert torch.allclose(q2[0, 0, 0], torch.tensor([math.cos(angle), 0, math.sin(angle), 0], dtype=torch.float64))


def test_nope_is_identity():
    q, k = _qk()
    q2, k2 = NoPE()(q, k, torch.arange(7))
    assert q2 is q and k2 is k


def test_pope_trig_in_float32_under_bf16_autocast():
    """A bf16 phase at position ~5000 would be off by radians; the float32 path keeps bf16 rounding only."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    pope = PoPE(16, 2, delta_init="uniform")
    positions = torch.arange(5000, 5005)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q2, k2 = pope(q.bfloat16(), k.bfloat16(), positions)
    assert q2.dtype == torch.bfloat16
    ref_q2, ref_k2 = pope.double()(q.bfloat16().double(), k.bfloat16().double(), positions)
    assert (q2.double() - ref_q2).abs().max() < 0.05  # bf16 has ~3 significant digits
    assert (k2.double() - ref_k2).abs().max() < 0.05


def test_rope_rejects_odd_head_dim_and_bad_positions():
    with pytest.raises(ValueError, match="even"):
        RoPE(7)
    q, k = _qk()
    with pytest.raises(ValueError, match="positions"):
        PoPE(8, 3).double()(q, k, torch.arange(6))
