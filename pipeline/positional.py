"""Position encodings, each a small module chosen by `model.position`.

q/k encodings (one per attention layer; forward(q, k, positions) -> (q2, k2)):
- `PoPE`  polar coordinate position embeddings (arXiv 2509.10534): every query/key element becomes a complex number
          μ·e^{iφ} with magnitude μ = softplus(x) and phase t·θ_c (query) or s·θ_c + δ_c (key), over d frequencies
          θ_c = base^(-c/d). The score Σ_c μ_q μ_k cos((s−t)θ_c + δ_c) is the real dot product of the Cartesian
          vectors [μ cos φ, μ sin φ], so PoPE hands attention q and k that are 2·head_dim wide. The paper's
          ablations (v3 Table 5) are switches: magnitude relu or identity ("no softplus"), and no δ at all.
- `RoPE`  rotary embeddings (rotate-half layout), d/2 frequencies θ_c = base^(-2c/d); `rope_half` rotates only the
          first head_dim/2 channels (GPT-NeoX's rotary_pct = 0.5), with frequencies over that rotary width. Either
          may carry YaRN (`Yarn`, Peng et al. 2023) for length extrapolation.
- `ALiBi` no change to q/k; attention adds −m_h·(t − s) to the logits (Press et al. 2022), through `bias`.
          `alibi_half`: the first ⌈H/2⌉ heads get the slopes of a ⌈H/2⌉-head ALiBi, the others no position.
- `NoPE`  no position information on q/k (`none`: causal masking alone; `learned`, `sinusoidal`: position enters
          with the input embeddings instead).

Input encodings (added to the token embeddings by the model): `LearnedPositions` (GPT-2's table, stops at
model.max_seq_len) and `SinusoidalPositions` (Vaswani et al.'s fixed sin/cos, any position).

positions is an integer tensor of shape (seq,) or (batch, seq); q, k are (batch, heads, seq, head_dim).
The trigonometry always runs in float32 or wider (float64 inputs stay float64), with autocast off: a bf16 phase of
t·θ for t in the thousands would be off by whole radians. Frequencies and slopes are not buffers, because DeepSpeed
casts a module's floating buffers to bf16/fp16 along with its weights; they are recomputed (and cached) per
device/dtype.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

TWO_PI = 2.0 * math.pi
POSITION_KINDS = ("pope", "rope", "rope_half", "alibi", "alibi_half", "sinusoidal", "learned", "none")
MAGNITUDES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softplus": F.softplus,  # the paper's PoPE
    "relu": F.relu,  # ablation: "ReLU instead of softplus"
    "identity": lambda x: x,  # ablation: "no softplus" (a negative magnitude acts as a phase shift of π)
}


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
    """A float64 vector made on the CPU on first use, then kept per (device, dtype); plain attribute state,
    invisible to .to()/state_dict. Made lazily so that building a model under `torch.device("meta")` (parameter
    counts) never computes it on the meta device."""

    def __init__(self, make: Callable[[], torch.Tensor]) -> None:
        self.make = make
        self.cache: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self.cache:
            self.cache[key] = self.make().to(device=device, dtype=dtype)
        return self.cache[key]


# ------------------------------------------------------------------------------------------------ YaRN


@dataclasses.dataclass(frozen=True)
class Yarn:
    """YaRN for RoPE (Peng, Quesnelle, Fan, Shippole 2023, "YaRN: Efficient Context Window Extension of Large
    Language Models", arXiv 2309.00071, §3.2 "NTK-by-parts" and §3.4), in the paper's formulas:

    - wavelength of frequency θ_d:      λ_d = 2π / θ_d
    - rotations within the trained context L:  r(d) = L / λ_d
    - ramp:     γ(r) = 0 if r < α;  1 if r > β;  (r − α)/(β − α) otherwise
    - frequency:    h(θ_d) = (1 − γ(r(d)))·θ_d / s + γ(r(d))·θ_d
      (frequencies that rotate fewer than α times within L are interpolated by the scale factor s, those that
      rotate more than β times are left alone, the ones between are blended)
    - attention temperature:  √(1/t) = 0.1·ln(s) + 1, applied by scaling both q and k by √(1/t), so the logits
      are multiplied by 1/t = (0.1·ln s + 1)²; s ≤ 1 leaves them alone.

    The reference code (jquesnelle/yarn, and HF transformers' YaRN) ramps linearly over the *dimension index*
    between the indices where r = β and r = α, rounded outwards; this follows the paper's ramp, linear in r. The
    two give the same frequencies away from the band and slightly different ones in and next to it.
    """

    factor: float  # s: the new context is about s × original_len
    original_len: int  # L: the context the model was trained at
    alpha: float = 1.0
    beta: float = 32.0

    def frequencies(self, theta: torch.Tensor) -> torch.Tensor:
        """h(θ) for every θ of `theta` (float64 in, float64 out)."""
        rotations = self.original_len * theta / TWO_PI  # r = L / λ = L·θ / 2π
        gamma = ((rotations - self.alpha) / (self.beta - self.alpha)).clamp(0.0, 1.0)
        return (1.0 - gamma) * theta / self.factor + gamma * theta

    @property
    def qk_factor(self) -> float:
        """√(1/t) = 0.1·ln(s) + 1 (1 for s ≤ 1): the factor q and k are each multiplied by."""
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1.0 else 1.0


# ------------------------------------------------------------------------------------------------ PoPE


class PoPE(nn.Module):
    """Polar coordinate position embeddings with a learnable key phase bias δ per head and frequency.

    δ has shape (n_heads, head_dim), starts at 0 ("zero": best for length generalisation, used for language) or
    U(-2π, 0) ("uniform": slightly better in distribution, used for music, genome and indirect indexing), and is
    clamped to [-2π, 0] in the forward pass (a δ of +1 acts as 0, of -10 as -2π; outside the range it gets no
    gradient, inside and on the bounds it does, so a zero-initialised δ can move).

    Ablations (the paper's v3 Table 5): `magnitude` is softplus (PoPE), relu, or identity (the raw q/k element,
    "no softplus"); `delta="none"` removes δ altogether (no parameter, key phase s·θ_c).
    """

    def __init__(self, head_dim: int, n_heads: int, base: float = 10000.0, delta_init: str = "zero",
                 magnitude: str = "softplus", delta: str = "learned") -> None:
        super().__init__()
        if delta_init not in ("zero", "uniform"):
            raise ValueError(f"delta_init must be 'zero' or 'uniform'; got {delta_init!r}")
        if magnitude not in MAGNITUDES:
            raise ValueError(f"PoPE magnitude must be one of {', '.join(MAGNITUDES)}; got {magnitude!r}")
        if delta not in ("learned", "none"):
            raise ValueError(f"PoPE delta must be 'learned' or 'none'; got {delta!r}")
        self.head_dim, self.n_heads, self.base, self.delta_init = head_dim, n_heads, base, delta_init
        self.magnitude = magnitude
        self.delta = nn.Parameter(torch.zeros(n_heads, head_dim)) if delta == "learned" else None
        self._theta = _FrequencyCache(lambda: frequencies(head_dim, 1, head_dim, base, torch.device("cpu"),
                                                          torch.float64))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.delta is None:
            return
        with torch.no_grad():
            if self.delta_init == "uniform":
                self.delta.uniform_(-TWO_PI, 0.0)
            else:
                self.delta.zero_()

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                fused_inputs: bool = False) -> tuple[torch.Tensor, ...]:
        """(q2, k2): the 2·head_dim-wide Cartesian queries and keys. With fused_inputs, instead what the fused kernel
        needs to compute them itself (see `fused_inputs`): asked through forward, not the method, so that hooks
        around forward (ZeRO-3 gathering its shard of δ) run."""
        if fused_inputs:
            return self.fused_inputs(positions, q.shape[-2], q.device)
        dtype = _compute_dtype(q)
        magnitude = MAGNITUDES[self.magnitude]
        with torch.autocast(device_type=q.device.type, enabled=False):
            angle = _positions_4d(positions, q.shape[-2], dtype) * self._theta.get(q.device, dtype)  # (B|1,1,T,d)
            key_angle = angle
            if self.delta is not None:
                key_angle = angle + self.delta.to(dtype).clamp(-TWO_PI, 0.0)[None, :, None, :]  # + (1,H,1,d)
            q2 = _polar_to_cartesian(magnitude(q.to(dtype)), angle)
            k2 = _polar_to_cartesian(magnitude(k.to(dtype)), key_angle)
        return q2.to(q.dtype), k2.to(k.dtype)

    def fused_inputs(self, positions: torch.Tensor, seq_len: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the fused kernel (pipeline/kernels) needs to compute this encoding itself, in float32: positions
        (1 or batch, seq), θ (head_dim,) and the clamped δ (n_heads, head_dim) or None. The clamp stays in autograd
        here, so δ's gradient is masked outside [-2π, 0] exactly as in forward()."""
        pos = _positions_4d(positions, seq_len, torch.float32)[:, 0, :, 0]
        theta = self._theta.get(device, torch.float32)
        delta = None if self.delta is None else self.delta.to(torch.float32).clamp(-TWO_PI, 0.0)
        return pos, theta, delta

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, n_heads={self.n_heads}, base={self.base}, magnitude={self.magnitude}, "
                f"delta={'none' if self.delta is None else self.delta_init}")


def _polar_to_cartesian(magnitude: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """[μ cos φ, μ sin φ] concatenated on the last dimension (halves layout; q and k use the same)."""
    return torch.cat([magnitude * torch.cos(angle), magnitude * torch.sin(angle)], dim=-1)


# ------------------------------------------------------------------------------------------------ RoPE


class RoPE(nn.Module):
    """Rotary position embeddings, rotate-half layout: channel c pairs with channel c + rotary_dim/2.

    rotary_dim (default head_dim) channels are rotated, at the frequencies θ_c = base^(-2c/rotary_dim),
    c < rotary_dim/2; the remaining head_dim − rotary_dim channels pass unrotated (GPT-NeoX's partial rotary, which
    `rope_half` uses with rotary_dim = head_dim/2). With `yarn`, the frequencies are YaRN's h(θ) and q, k are both
    scaled by its √(1/t). (The interleaved layout is the same up to a fixed permutation of the q/k projection
    channels, which makes no difference when training from scratch.)
    """

    def __init__(self, head_dim: int, base: float = 10000.0, rotary_dim: int | None = None,
                 yarn: Yarn | None = None) -> None:
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim; got {head_dim}")
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"RoPE's rotary width must be even and in 1..{head_dim}; got {rotary_dim}")
        self.head_dim, self.base, self.rotary_dim, self.yarn = head_dim, base, rotary_dim, yarn

        def make() -> torch.Tensor:
            theta = frequencies(rotary_dim // 2, 2, rotary_dim, base, torch.device("cpu"), torch.float64)
            return yarn.frequencies(theta) if yarn is not None else theta

        self._theta = _FrequencyCache(make)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _compute_dtype(q)
        r = self.rotary_dim
        with torch.autocast(device_type=q.device.type, enabled=False):
            angle = _positions_4d(positions, q.shape[-2], dtype) * self._theta.get(q.device, dtype)  # (B|1,1,T,r/2)
            angle = torch.cat([angle, angle], dim=-1)
            cos, sin = torch.cos(angle), torch.sin(angle)
            if self.yarn is not None:  # √(1/t) on q and on k: the logits get 1/t
                cos, sin = cos * self.yarn.qk_factor, sin * self.yarn.qk_factor

            def rotate(x: torch.Tensor) -> torch.Tensor:
                x = x.to(dtype)
                rotated = x[..., :r] * cos + _rotate_half(x[..., :r]) * sin
                if r == self.head_dim:
                    return rotated
                # YaRN's temperature divides the whole logit by t, so the unrotated channels get √(1/t) too
                rest = x[..., r:] * self.yarn.qk_factor if self.yarn is not None else x[..., r:]
                return torch.cat([rotated, rest], dim=-1)

            q2, k2 = rotate(q), rotate(k)
        return q2.to(q.dtype), k2.to(k.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, yarn={self.yarn}"


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


# ------------------------------------------------------------------------------------------------ ALiBi


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi's head slopes (Press, Smith, Lewis 2022, "Train Short, Test Long", §3 and their code).

    For n a power of 2: the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8) (start = ratio = 2^(-8/n)).
    Otherwise, with m the largest power of 2 below n: the m slopes of an m-head model, followed by the first
    n − m of every other slope (the 1st, 3rd, 5th, ...) of a 2m-head model.
    """
    if n_heads < 1:
        raise ValueError(f"ALiBi needs at least one head; got {n_heads}")
    if n_heads & (n_heads - 1) == 0:
        return [2.0 ** (-8.0 * (i + 1) / n_heads) for i in range(n_heads)]
    power = 1 << (n_heads.bit_length() - 1)
    return alibi_slopes(power) + alibi_slopes(2 * power)[0::2][: n_heads - power]


class ALiBi(nn.Module):
    """Attention with linear biases: q and k pass unchanged; `bias` gives what attention adds to the logits,
    −m_h·(p_t − p_s) for query position p_t and key position p_s (Press et al. 2022).

    half=True (`alibi_half`): the first ⌈H/2⌉ heads carry the slopes of a ⌈H/2⌉-head ALiBi and the other ⌊H/2⌋
    have slope 0, no position at all. Rounding up keeps at least one positional head (H = 1 is plain ALiBi).
    """

    def __init__(self, n_heads: int, half: bool = False) -> None:
        super().__init__()
        self.n_heads, self.half = n_heads, half
        with_position = (n_heads + 1) // 2 if half else n_heads
        slopes = alibi_slopes(with_position) + [0.0] * (n_heads - with_position)
        self._slopes = _FrequencyCache(lambda: torch.tensor(slopes, dtype=torch.float64, device="cpu"))

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def slopes(self) -> torch.Tensor:
        """(n_heads,) float64 on the CPU."""
        return self._slopes.get(torch.device("cpu"), torch.float64)

    def bias(self, query_positions: torch.Tensor, key_positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(batch|1, heads, queries, keys) additive logit bias −m_h·(p_t − p_s), computed in float32 or wider,
        returned in `dtype` (SDPA wants its float mask in the dtype of q). Causal masking is the caller's."""
        wide = torch.promote_types(dtype, torch.float32)
        query, key = (p[None] if p.dim() == 1 else p for p in (query_positions, key_positions))
        distance = (query[:, :, None] - key[:, None, :]).to(wide)  # (B|1, Tq, Tk)
        slopes = self._slopes.get(query.device, wide)
        return (-slopes[None, :, None, None] * distance[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, half={self.half}"


# ------------------------------------------------------------------------------------------------ no position


class NoPE(nn.Module):
    """No position encoding on q/k (used alone, or with learned or sinusoidal positions at the input)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k


# ------------------------------------------------------------------------------------------------ absolute


class LearnedPositions(nn.Module):
    """Learned absolute position embeddings, added to the token embeddings (GPT-2's wpe)."""

    def __init__(self, max_seq_len: int, d_model: int) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.embedding = nn.Embedding(max_seq_len, d_model)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.embedding(positions)  # (seq, d_model) or (batch, seq, d_model)


class SinusoidalPositions(nn.Module):
    """Fixed absolute positions (Vaswani et al. 2017, §3.5), added to the token embeddings, for any position:
    PE(p, 2i) = sin(p·ω_i), PE(p, 2i+1) = cos(p·ω_i), ω_i = base^(-2i/d_model) (base 10000 there; here
    model.position_base). An odd d_model ends with a sine column.

    Scale: Vaswani et al. add the table to the embeddings multiplied by √d_model. With this model's tied N(0, 0.02)
    embeddings the same ratio is had by adding the table divided by √d_model: per channel RMS 1/√(2·d_model)
    (0.026 at d_model = 768), next to the embeddings' 0.02. Amplitude-1 sinusoids would swamp the tokens.
    """

    def __init__(self, d_model: int, base: float = 10000.0) -> None:
        super().__init__()
        self.d_model, self.base = d_model, base
        self._omega = _FrequencyCache(lambda: frequencies((d_model + 1) // 2, 2, d_model, base,
                                                          torch.device("cpu"), torch.float64))

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(seq,) or (batch, seq) → (seq, d_model) or (batch, seq, d_model) in `dtype` (float32 or wider: at
        position 10^4 a float32 angle is off by ~1e-3 rad, a bf16 one by whole radians)."""
        dtype = torch.promote_types(dtype, torch.float32)
        omega = self._omega.get(positions.device, dtype)
        with torch.autocast(device_type=positions.device.type, enabled=False):
            angle = positions.to(dtype)[..., None] * omega  # (..., ⌈d/2⌉)
            table = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).flatten(-2)  # sin, cos interleaved
        return table[..., : self.d_model] / math.sqrt(self.d_model)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, base={self.base}"


# ------------------------------------------------------------------------------------------------ choosing


def build_qk_encoding(kind: str, head_dim: int, n_heads: int, base: float = 10000.0, delta_init: str = "zero", *,
                      magnitude: str = "softplus", delta: str = "learned", yarn: Yarn | None = None) -> nn.Module:
    """The module that attention applies to q and k for `model.position` = kind (one per layer)."""
    if yarn is not None and kind not in ("rope", "rope_half"):
        raise ValueError(f"YaRN scales RoPE frequencies; model.position={kind} has none")
    if kind == "pope":
        return PoPE(head_dim, n_heads, base=base, delta_init=delta_init, magnitude=magnitude, delta=delta)
    if kind == "rope":
        return RoPE(head_dim, base=base, yarn=yarn)
    if kind == "rope_half":
        if head_dim % 4:
            raise ValueError(f"rope_half rotates head_dim/2 channels in pairs: head_dim must be divisible by 4; "
                             f"got {head_dim}")
        return RoPE(head_dim, base=base, rotary_dim=head_dim // 2, yarn=yarn)
    if kind in ("alibi", "alibi_half"):
        return ALiBi(n_heads, half=kind == "alibi_half")
    if kind in ("none", "learned", "sinusoidal"):
        return NoPE()
    raise ValueError(f"unknown position encoding {kind!r}; choose one of {', '.join(POSITION_KINDS)}")


def qk_width(kind: str, head_dim: int) -> int:
    """The last dimension of q and k after the encoding: PoPE doubles it."""
    return 2 * head_dim if kind == "pope" else head_dim
