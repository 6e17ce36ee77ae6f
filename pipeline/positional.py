"""Position encodings, each a small module chosen by `model.position`.

- `PoPE`  polar coordinate position embeddings (arXiv 2509.10534): every query/key element becomes a complex number
          μ·e^{iφ} with magnitude μ = softplus(x) and phase t·θ_c (query) or s·θ_c + δ_c (key), over d frequencies
          θ_c = base^(-c/d). The score Σ_c μ_q μ_k cos((s−t)θ_c + δ_c) is the real dot product of the Cartesian
          vectors [μ cos φ, μ sin φ], so PoPE hands attention q and k that are 2·head_dim wide.
- `RoPE`  rotary embeddings (rotate-half layout), d/2 frequencies θ_c = base^(-2c/d).
- `NoPE`  no position information at all (causal masking alone).
- `LearnedPositions`  GPT-2 style absolute embeddings added to the token embeddings; attention then uses NoPE.

The q/k modules share one signature: forward(q, k, positions) -> (q2, k2), with q, k of shape
(batch, heads, seq, head_dim) and positions an integer tensor of shape (seq,) or (batch, seq).

The trigonometry always runs in float32 or wider (float64 inputs stay float64), with autocast off: a bf16 phase of
t·θ for t in the thousands would be off by whole radians. Frequencies are not buffers, because DeepSpeed casts a
module's floating buffers to bf16/fp16 along with its weights; they are recomputed (and cached) per device/dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TWO_PI = 2.0 * math.pi
POSITION_KINDS = ("pope", "rope", "none", "learned")


def frequencies(n: int, step: int, dim: int, base: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """θ_c = base^(-(step·c)/dim) for c = 0..n-1, computed in float64 then cast."""
    exponents = torch.arange(n, dtype=torch.float64, device=device) * step / dim
    return (base ** -exponents).to(dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half types and float32, float64 for float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _positions_4d(positions: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """(seq,) or (batch, seq) integer positions → (batch|1, 1, seq, 1) floats, ready to broadcast over heads."""
    if positions.dim() == 1:
        out = positions[None, None, :, None]
    elif positions.dim() == 2:
        out = positions[:, None, :, None]
    else:
        raise ValueError(f"positions must have shape (seq,) or (batch, seq); got {tuple(positions.shape)}")
    if positions.shape[-1] != seq_len:
        raise ValueError(f"positions cover {positions.shape[-1]} tokens but q/k have {seq_len}")
    return out.to(dtype)


class _FrequencyCache:
    """Frequencies per (device, dtype), rebuilt lazily; plain attribute state, invisible to .to()/state_dict."""

    def __init__(self, n: int, step: int, dim: int, base: float) -> None:
        self.args = (n, step, dim, base)
        self.cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self.cache:
            self.cache[key] = frequencies(*self.args, device=device, dtype=dtype)
        return self.cache[key]


class PoPE(nn.Module):
    """Polar coordinate position embeddings with a learnable key phase bias δ per head and frequency.

    δ has shape (n_heads, head_dim), starts at 0 ("zero": best for length generalisation, used for language) or
    U(-2π, 0) ("uniform": slightly better in distribution, used for music, genome and indirect indexing), and is
    clamped to [-2π, 0] in the forward pass (a δ of +1 acts as 0, of -10 as -2π; outside the range it gets no
    gradient, inside and on the bounds it does, so a zero-initialised δ can move).
    """

    def __init__(self, head_dim: int, n_heads: int, base: float = 10000.0, delta_init: str = "zero") -> None:
        super().__init__()
        if delta_init not in ("zero", "uniform"):
            raise ValueError(f"delta_init must be 'zero' or 'uniform'; got {delta_init!r}")
        self.head_dim, self.n_heads, self.base, self.delta_init = head_dim, n_heads, base, delta_init
        self.delta = nn.Parameter(torch.zeros(n_heads, head_dim))
        self._theta = _FrequencyCache(head_dim, 1, head_dim, base)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.delta_init == "uniform":
                self.delta.uniform_(-TWO_PI, 0.0)
            else:
                self.delta.zero_()

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _compute_dtype(q)
        with torch.autocast(device_type=q.device.type, enabled=False):
            angle = _positions_4d(positions, q.shape[-2], dtype) * self._theta.get(q.device, dtype)  # (B|1,1,T,d)
            delta = self.delta.to(dtype).clamp(-TWO_PI, 0.0)[None, :, None, :]  # (1,H,1,d)
            q2 = _polar_to_cartesian(F.softplus(q.to(dtype)), angle)
            k2 = _polar_to_cartesian(F.softplus(k.to(dtype)), angle + delta)
        return q2.to(q.dtype), k2.to(k.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, n_heads={self.n_heads}, base={self.base}, delta_init={self.delta_init}"


def _polar_to_cartesian(magnitude: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """[μ cos φ, μ sin φ] concatenated on the last dimension (halves layout; q and k use the same)."""
    return torch.cat([magnitude * torch.cos(angle), magnitude * torch.sin(angle)], dim=-1)


class RoPE(nn.Module):
    """Rotary position embeddings, rotate-half layout: channel c pairs with channel c + head_dim/2.

    (The interleaved layout is the same up to a fixed permutation of the q/k projection channels, which makes no
    difference when training from scratch.)
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim; got {head_dim}")
        self.head_dim, self.base = head_dim, base
        self._theta = _FrequencyCache(head_dim // 2, 2, head_dim, base)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _compute_dtype(q)
        with torch.autocast(device_type=q.device.type, enabled=False):
            angle = _positions_4d(positions, q.shape[-2], dtype) * self._theta.get(q.device, dtype)  # (B|1,1,T,d/2)
            angle = torch.cat([angle, angle], dim=-1)
            cos, sin = torch.cos(angle), torch.sin(angle)
            q2 = q.to(dtype) * cos + _rotate_half(q.to(dtype)) * sin
            k2 = k.to(dtype) * cos + _rotate_half(k.to(dtype)) * sin
        return q2.to(q.dtype), k2.to(k.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class NoPE(nn.Module):
    """No position encoding on q/k (used alone, or with LearnedPositions at the input)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


class LearnedPositions(nn.Module):
    """Learned absolute position embeddings, added to the token embeddings (GPT-2's wpe)."""

    def __init__(self, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.embedding = nn.Embedding(max_seq_len, d_model)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.embedding(positions)  # (seq, d_model) or (batch, seq, d_model)


def build_qk_encoding(kind: str, head_dim: int, n_heads: int, base: float = 10000.0,
                      delta_init: str = "zero") -> nn.Module:
    """The module that attention applies to q and k for `model.position` = kind (one per layer)."""
    if kind == "pope":
        return PoPE(head_dim, n_heads, base=base, delta_init=delta_init)
    if kind == "rope":
        return RoPE(head_dim, base=base)
    if kind in ("none", "learned"):
        return NoPE()
    raise ValueError(f"unknown position encoding {kind!r}; choose one of {', '.join(POSITION_KINDS)}")


def qk_width(kind: str, head_dim: int) -> int:
    """The last dimension of q and k after the encoding: PoPE doubles it."""
    return 2 * head_dim if kind == "pope" else head_dim
