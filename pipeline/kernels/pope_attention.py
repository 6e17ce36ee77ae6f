"""Fused causal PoPE attention in Triton: FlashAttention-style forward and backward that never materialises the
2·head_dim-wide Cartesian queries and keys (nor a zero-padded v).

The reference path (pipeline/positional.py PoPE, then pipeline/model.py causal_attention) computes, per head,

    q2 = [μ(q)·cos(t·θ), μ(q)·sin(t·θ)],   k2 = [μ(k)·cos(s·θ + δ), μ(k)·sin(s·θ + δ)]
    out = softmax(q2·k2ᵀ·scale + causal mask)·v

with μ the magnitude (softplus, or the relu/identity ablations), θ_c = base^(-c/d), δ the clamped key phase bias.
Here the kernels load q, k, v (head_dim d each), compute μ, cos and sin in float32 registers, and split the 2d-wide
dot product into two d-wide ones: q2·k2ᵀ = (μq cos)·(μk cos)ᵀ + (μq sin)·(μk sin)ᵀ. The Cartesian halves are cast to
the input dtype before the dot products, exactly where the reference casts q2 and k2, so tensor cores are used in
bf16/fp16 and fp32 runs true fp32 (input_precision="ieee", never TF32).

Angles: computed as position·θ (+ δ) in float32 like the reference, then reduced to [-π, π] with a two-constant
(Cody-Waite) 2π before cos/sin, so the trigonometry is accurate for the thousands of radians long contexts reach
whichever cos/sin the backend compiles to. Exact for |angle| < 2^16·2π (positions up to ~400k at θ_0 = 1).

Backward (FlashAttention-2 style, recomputing the probabilities from the saved log-sum-exp): one kernel per query
block for dq (it also computes D = rowsum(dO∘O) and stores it), then one per key block for dk, dv and its share of
dδ. dδ's shares, one per (batch, head, key block), go to a small float32 buffer and are summed by torch: no atomics,
so every gradient is deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAGNITUDE_CODES = {"softplus": 0, "relu": 1, "identity": 2}
_INV_TWO_PI = 0.15915494309189535
_TWO_PI_HI = 6.28125  # 201/32: k·_TWO_PI_HI is exact in float32 for |k| < 2^16
_TWO_PI_LO = 0.0019353071795864769  # 2π − _TWO_PI_HI


@triton.jit
def _reduce_angle(a):
    """a − 2π·round(a / 2π), in [-π, π], with 2π split into two constants (Cody-Waite)."""
    turns = tl.floor(a * _INV_TWO_PI + 0.5)
    return (a - turns * _TWO_PI_HI) - turns * _TWO_PI_LO


@triton.jit
def _magnitude(x, MAGNITUDE: tl.constexpr):
    """μ(x) in float32: softplus (written max(x,0) + log(1 + e^-|x|), which never overflows), relu, identity."""
    if MAGNITUDE == 0:
        return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))
    elif MAGNITUDE == 1:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def _magnitude_grad(x, MAGNITUDE: tl.constexpr):
    """dμ/dx: sigmoid, the step (0 at x = 0, as torch's relu), 1."""
    if MAGNITUDE == 0:
        return tl.sigmoid(x)
    elif MAGNITUDE == 1:
        return tl.where(x > 0.0, 1.0, 0.0)
    else:
        return x * 0.0 + 1.0


@triton.jit
def _polar(X, POS, THETA, DELTA, rows, offs_d, T, stride_t,
           MAGNITUDE: tl.constexpr, HAS_DELTA: tl.constexpr):
    """Load a (rows, d) tile of raw q or k; return x (float32), μ(x), cos φ and sin φ for φ = pos·θ (+ δ)."""
    x = tl.load(X + rows[:, None] * stride_t + offs_d[None, :], mask=rows[:, None] < T, other=0.0).to(tl.float32)
    pos = tl.load(POS + rows, mask=rows < T, other=0.0)
    theta = tl.load(THETA + offs_d)
    angle = pos[:, None] * theta[None, :]
    if HAS_DELTA:
        angle = angle + tl.load(DELTA + offs_d)[None, :]
    angle = _reduce_angle(angle)
    return x, _magnitude(x, MAGNITUDE), tl.cos(angle), tl.sin(angle)


@triton.jit
def _forward_kernel(Q, K, V, THETA, DELTA, POS, OUT, LSE,
                    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_pb,
                    H, T, scale,
                    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    MAGNITUDE: tl.constexpr, HAS_DELTA: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    POS += b * s_pb
    DELTA += h * D
    dtype = Q.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)

    _, mu, cos, sin = _polar(Q, POS, THETA, DELTA, rows, offs_d, T, s_qt, MAGNITUDE, False)
    qc, qs = (mu * cos).to(dtype), (mu * sin).to(dtype)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for start in range(0, hi, BLOCK_N):
        cols = start + offs_n
        _, mu_k, cos_k, sin_k = _polar(K, POS, THETA, DELTA, cols, offs_d, T, s_kt, MAGNITUDE, HAS_DELTA)
        kc, ks = (mu_k * cos_k).to(dtype), (mu_k * sin_k).to(dtype)
        s = tl.dot(qc, tl.trans(kc), input_precision="ieee") + tl.dot(qs, tl.trans(ks), input_precision="ieee")
        s = tl.where((rows[:, None] >= cols[None, :]) & (cols[None, :] < T), s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + cols[:, None] * s_vt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v, input_precision="ieee")
        m_i = m_new
    acc = acc / l_i[:, None]
    OUT += b * s_ob + h * s_oh
    tl.store(OUT + rows[:, None] * s_ot + offs_d[None, :], acc.to(dtype), mask=rows[:, None] < T)
    tl.store(LSE + bh * T + rows, m_i + tl.log(l_i), mask=rows < T)


@triton.jit
def _backward_dq_kernel(Q, K, V, THETA, DELTA, POS, OUT, DO, LSE, DSUM, DQ,
                        s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
                        s_gb, s_gh, s_gt, s_dqb, s_dqh, s_dqt, s_pb,
                        H, T, scale,
                        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        MAGNITUDE: tl.constexpr, HAS_DELTA: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    POS += b * s_pb
    DELTA += h * D
    dtype = Q.dtype.element_ty
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_ok = rows < T

    x, mu, cos, sin = _polar(Q, POS, THETA, DELTA, rows, offs_d, T, s_qt, MAGNITUDE, False)
    qc, qs = (mu * cos).to(dtype), (mu * sin).to(dtype)
    o = tl.load(OUT + b * s_ob + h * s_oh + rows[:, None] * s_ot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * s_gb + h * s_gh + rows[:, None] * s_gt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    dsum = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # D_i = rowsum(dO ∘ O)
    tl.store(DSUM + bh * T + rows, dsum, mask=row_ok)
    lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)

    dqc = tl.zeros([BLOCK_M, D], tl.float32)
    dqs = tl.zeros([BLOCK_M, D], tl.float32)
    hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    for start in range(0, hi, BLOCK_N):
        cols = start + offs_n
        _, mu_k, cos_k, sin_k = _polar(K, POS, THETA, DELTA, cols, offs_d, T, s_kt, MAGNITUDE, HAS_DELTA)
        kc, ks = (mu_k * cos_k).to(dtype), (mu_k * sin_k).to(dtype)
        v = tl.load(V + cols[:, None] * s_vt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
        s = tl.dot(qc, tl.trans(kc), input_precision="ieee") + tl.dot(qs, tl.trans(ks), input_precision="ieee")
        visible = (rows[:, None] >= cols[None, :]) & (cols[None, :] < T) & row_ok[:, None]
        p = tl.where(visible, tl.exp(s * scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = (p * (dp - dsum[:, None])).to(dtype)
        dqc += tl.dot(ds, kc, input_precision="ieee")
        dqs += tl.dot(ds, ks, input_precision="ieee")
    # back through q2 = [μ cos φ, μ sin φ] (φ = t·θ has no parameter on the query side) and μ(q)
    dq = (dqc * cos + dqs * sin) * scale * _magnitude_grad(x, MAGNITUDE)
    DQ += b * s_dqb + h * s_dqh
    tl.store(DQ + rows[:, None] * s_dqt + offs_d[None, :], dq.to(dtype), mask=row_ok[:, None])


@triton.jit
def _backward_dkdv_kernel(Q, K, V, THETA, DELTA, POS, DO, LSE, DSUM, DK, DV, DDELTA,
                          s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
                          s_gb, s_gh, s_gt, s_dkb, s_dkh, s_dkt, s_dvb, s_dvh, s_dvt, s_pb,
                          H, T, N_BLOCKS, scale,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          MAGNITUDE: tl.constexpr, HAS_DELTA: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    Q += b * s_qb + h * s_qh
    K += b * s_kb + h * s_kh
    V += b * s_vb + h * s_vh
    DO += b * s_gb + h * s_gh
    POS += b * s_pb
    DELTA += h * D
    dtype = Q.dtype.element_ty
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    col_ok = cols < T

    x, mu_k, cos_k, sin_k = _polar(K, POS, THETA, DELTA, cols, offs_d, T, s_kt, MAGNITUDE, HAS_DELTA)
    kc, ks = (mu_k * cos_k).to(dtype), (mu_k * sin_k).to(dtype)
    v = tl.load(V + cols[:, None] * s_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)

    dkc = tl.zeros([BLOCK_N, D], tl.float32)
    dks = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # the first query block with a row that sees this key block
    for start in range(lo, T, BLOCK_M):
        rows = start + offs_m
        row_ok = rows < T
        _, mu, cos, sin = _polar(Q, POS, THETA, DELTA, rows, offs_d, T, s_qt, MAGNITUDE, False)
        qc, qs = (mu * cos).to(dtype), (mu * sin).to(dtype)
        do = tl.load(DO + rows[:, None] * s_gt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * T + rows, mask=row_ok, other=0.0)
        dsum = tl.load(DSUM + bh * T + rows, mask=row_ok, other=0.0)
        st = tl.dot(kc, tl.trans(qc), input_precision="ieee") + tl.dot(ks, tl.trans(qs), input_precision="ieee")
        visible = (rows[None, :] >= cols[:, None]) & row_ok[None, :] & col_ok[:, None]
        pt = tl.where(visible, tl.exp(st * scale - lse[None, :]), 0.0)  # (keys, queries)
        dv += tl.dot(pt.to(dtype), do, input_precision="ieee")
        dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
        dst = (pt * (dpt - dsum[None, :])).to(dtype)
        dkc += tl.dot(dst, qc, input_precision="ieee")
        dks += tl.dot(dst, qs, input_precision="ieee")
    dkc, dks = dkc * scale, dks * scale
    # back through k2 = [μ cos φ, μ sin φ], φ = s·θ + δ: ∂/∂μ = (cos φ, sin φ), ∂/∂φ = μ·(−sin φ, cos φ)
    dk = (dkc * cos_k + dks * sin_k) * _magnitude_grad(x, MAGNITUDE)
    DK += b * s_dkb + h * s_dkh
    DV += b * s_dvb + h * s_dvh
    tl.store(DK + cols[:, None] * s_dkt + offs_d[None, :], dk.to(dtype), mask=col_ok[:, None])
    tl.store(DV + cols[:, None] * s_dvt + offs_d[None, :], dv.to(dtype), mask=col_ok[:, None])
    if HAS_DELTA:
        dphase = tl.where(col_ok[:, None], mu_k * (dks * cos_k - dkc * sin_k), 0.0)
        tl.store(DDELTA + (bh * N_BLOCKS + pid_n) * D + offs_d, tl.sum(dphase, 0))


def _blocks(head_dim: int, interpreted: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Small under the interpreter (its cost grows with the tile);
    on GPUs a FlashAttention-2-like choice, not yet tuned on hardware: the Cartesian halves of q double the
    registers a query tile holds, so d = 128 gets narrower key tiles."""
    if interpreted:
        return 32, 32, 4, 1
    if head_dim <= 64:
        return 64, 64, 4, 3
    return 64, 32, 4, 2


def _interpreted() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 when this module loaded)."""
    return type(_forward_kernel).__name__ == "InterpretedFunction"


def _bht(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _empty_bhtd(like: torch.Tensor) -> torch.Tensor:
    """A (batch, heads, T, d) tensor laid out as (batch, T, heads, d): the model's transpose(1, 2).reshape of the
    attention output is then free."""
    b, h, t, d = like.shape
    return torch.empty(b, t, h, d, device=like.device, dtype=like.dtype).transpose(1, 2)


class PoPEAttention(torch.autograd.Function):
    """Causal PoPE attention; see `pope_attention`."""

    @staticmethod
    def forward(ctx, q, k, v, theta, delta, positions, scale, magnitude):  # type: ignore[override]
        batch, heads, seq, dim = q.shape
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        interpreted = _interpreted()
        block_m, block_n, warps, stages = _blocks(dim, interpreted)
        out = _empty_bhtd(q)
        lse = torch.empty(batch * heads, seq, device=q.device, dtype=torch.float32)
        has_delta = delta is not None
        delta_arg = delta if has_delta else theta  # never read without δ
        launch = {} if interpreted else {"num_warps": warps, "num_stages": stages}
        grid = (triton.cdiv(seq, block_m), batch * heads)
        _forward_kernel[grid](q, k, v, theta, delta_arg, positions, out, lse,
                              *_bht(q), *_bht(k), *_bht(v), *_bht(out), positions.stride(0) if positions.shape[0] > 1
                              else 0, heads, seq, scale, D=dim, BLOCK_M=block_m, BLOCK_N=block_n,
                              MAGNITUDE=MAGNITUDE_CODES[magnitude], HAS_DELTA=has_delta, **launch)
        ctx.save_for_backward(q, k, v, theta, delta_arg, positions, out, lse)
        ctx.scale, ctx.magnitude, ctx.has_delta = scale, magnitude, has_delta
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, theta, delta_arg, positions, out, lse = ctx.saved_tensors
        batch, heads, seq, dim = q.shape
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        interpreted = _interpreted()
        block_m, block_n, warps, stages = _blocks(dim, interpreted)
        launch = {} if interpreted else {"num_warps": warps, "num_stages": stages}
        pos_stride = positions.stride(0) if positions.shape[0] > 1 else 0
        code = MAGNITUDE_CODES[ctx.magnitude]
        dq, dk, dv = _empty_bhtd(q), _empty_bhtd(k), _empty_bhtd(v)
        dsum = torch.empty_like(lse)
        _backward_dq_kernel[(triton.cdiv(seq, block_m), batch * heads)](
            q, k, v, theta, delta_arg, positions, out, dout, lse, dsum, dq,
            *_bht(q), *_bht(k), *_bht(v), *_bht(out), *_bht(dout), *_bht(dq), pos_stride,
            heads, seq, ctx.scale, D=dim, BLOCK_M=block_m, BLOCK_N=block_n, MAGNITUDE=code,
            HAS_DELTA=ctx.has_delta, **launch)
        n_blocks = triton.cdiv(seq, block_n)
        ddelta = torch.empty(batch * heads, n_blocks, dim, device=q.device, dtype=torch.float32) \
            if ctx.has_delta else lse
        _backward_dkdv_kernel[(n_blocks, batch * heads)](
            q, k, v, theta, delta_arg, positions, dout, lse, dsum, dk, dv, ddelta,
            *_bht(q), *_bht(k), *_bht(v), *_bht(dout), *_bht(dk), *_bht(dv), pos_stride,
            heads, seq, n_blocks, ctx.scale, D=dim, BLOCK_M=block_m, BLOCK_N=block_n, MAGNITUDE=code,
            HAS_DELTA=ctx.has_delta, **launch)
        grad_delta = ddelta.view(batch, heads, n_blocks, dim).sum(dim=(0, 2)) if ctx.has_delta else None
        return dq, dk, dv, None, grad_delta, None, None, None


def pope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, theta: torch.Tensor,
                   delta: torch.Tensor | None, positions: torch.Tensor, scale: float,
                   magnitude: str = "softplus") -> torch.Tensor:
    """Causal PoPE attention of raw q, k, v (batch, heads, T, d; any strides with the last one 1; fp32, fp16 or
    bf16) → (batch, heads, T, d).

    theta: (d,) float32 frequencies; delta: (heads, d) float32 key phase bias, already clamped (None: no δ);
    positions: (1 or batch, T) float32 positions of the T tokens (queries and keys alike; the mask is causal by
    index, as SDPA's is_causal). Differentiable in q, k, v and delta.
    """
    if magnitude not in MAGNITUDE_CODES:
        raise ValueError(f"fused PoPE attention supports magnitudes {', '.join(MAGNITUDE_CODES)}; got {magnitude!r}")
    if not (q.shape == k.shape == v.shape and q.dim() == 4):
        raise ValueError(f"q, k, v must share one (batch, heads, T, d) shape; got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        raise ValueError(f"fused PoPE attention takes fp32, fp16 or bf16 q/k/v of one dtype; got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    dim = q.shape[-1]
    if dim < 16 or dim & (dim - 1):
        raise ValueError(f"fused PoPE attention needs a power-of-two head_dim >= 16; got {dim}")
    if positions.dim() != 2 or positions.shape[-1] != q.shape[-2] or positions.shape[0] not in (1, q.shape[0]):
        raise ValueError(f"positions must be (1 or batch, T); got {tuple(positions.shape)} for q {tuple(q.shape)}")
    positions = positions.to(torch.float32)
    if positions.stride(-1) != 1:
        positions = positions.contiguous()
    theta = theta.to(torch.float32).contiguous()
    if delta is not None:
        delta = delta.to(torch.float32).contiguous()
    return PoPEAttention.apply(q, k, v, theta, delta, positions, float(scale), magnitude)
