"""Every `model.position`, PoPE ablation and YaRN against reference formulas written out here, in float64.

The references use Python loops over query t, key s and channel c with the published formulas (PoPE: arXiv
2509.10534 Eq. 3-6; RoPE as a 2-D rotation of the pairs (c, c + r/2); ALiBi: Press et al. 2022; sinusoidal:
Vaswani et al. 2017; YaRN: Peng et al. 2023, §3.2 and §3.4), never the modules' own vectorised code. One attention
layer's whole output (projections, scores, causal softmax, values, output projection) is compared, so the wiring
is checked too; head counts are 6 (not a power of 2) and sequences 7 tokens long.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from pipeline.config import (Config, ConfigError, ModelConfig, RopeScalingConfig, apply_model_overrides,
                             model_config_from_dict, model_identity, validate)
from pipeline.model import CausalSelfAttention, Transformer
from pipeline.positional import POSITION_KINDS, ALiBi, RoPE, Yarn, alibi_slopes, build_qk_encoding

TWO_PI = 2 * math.pi
YARN = RopeScalingConfig(type="yarn", factor=4.0, original_max_seq_len=64)

# name -> ModelConfig keys (d_model 72, 6 heads: head_dim 12, so rope_half rotates 6 channels at 3 frequencies)
VARIANTS = {
    "pope": {},
    "pope_relu": {"pope_magnitude": "relu"},
    "pope_identity": {"pope_magnitude": "identity"},
    "pope_no_delta": {"pope_delta": "none"},
    "rope": {"position": "rope"},
    "rope_half": {"position": "rope_half"},
    "rope_yarn": {"position": "rope", "rope_scaling": YARN},
    "rope_half_yarn": {"position": "rope_half", "rope_scaling": YARN},
    "alibi": {"position": "alibi"},
    "alibi_half": {"position": "alibi_half"},
    "none": {"position": "none"},
    "sinusoidal": {"position": "sinusoidal"},
    "learned": {"position": "learned"},
}


def config(variant: str = "pope", **kw) -> ModelConfig:
    keys = dict(vocab_size=40, d_model=72, n_heads=6, n_layers=2, max_seq_len=16, position="pope",
                pope_delta_init="uniform", init_std=0.3)
    keys.update(VARIANTS[variant])
    keys.update(kw)
    return ModelConfig(**keys)


# ------------------------------------------------------------------------------------------ reference formulas


def yarn_theta(theta: float, s: float, L: int, alpha: float, beta: float) -> float:
    """The paper's h(θ): λ = 2π/θ, r = L/λ, γ the ramp, h = (1−γ)θ/s + γθ."""
    r = L / (2 * math.pi / theta)
    gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
    return (1 - gamma) * theta / s + gamma * theta


def reference_score(cfg: ModelConfig, layer: CausalSelfAttention, h: int, q: list, k: list, pt: int, ps: int) -> float:
    """The pre-softmax score of query (position pt) and key (position ps) in head h, scale included."""
    d = len(q)
    base = cfg.position_base
    scale = 1 / math.sqrt(d)
    kind = cfg.position
    if kind == "pope":
        mu = {"softplus": lambda x: math.log1p(math.exp(x)), "relu": lambda x: max(x, 0.0),
              "identity": lambda x: x}[cfg.pope_magnitude]
        delta = ([min(max(float(x), -TWO_PI), 0.0) for x in layer.position.delta[h].detach()]
                 if cfg.pope_delta == "learned" else [0.0] * d)
        return scale * sum(mu(q[c]) * mu(k[c]) * math.cos((ps - pt) * base ** (-c / d) + delta[c]) for c in range(d))
    if kind in ("rope", "rope_half"):
        r = d if kind == "rope" else d // 2
        y = cfg.rope_scaling
        total = 0.0
        for j in range(r // 2):
            theta = base ** (-2 * j / r)
            if y.type == "yarn":
                theta = yarn_theta(theta, y.factor, y.original_max_seq_len, y.alpha, y.beta)
            angle = (ps - pt) * theta
            qa, qb, ka, kb = q[j], q[j + r // 2], k[j], k[j + r // 2]
            total += (qa * ka + qb * kb) * math.cos(angle) + (qb * ka - qa * kb) * math.sin(angle)
        total += sum(q[c] * k[c] for c in range(r, d))  # unrotated channels
        temperature = (0.1 * math.log(y.factor) + 1) ** 2 if y.type == "yarn" else 1.0
        return scale * total * temperature
    dot = scale * sum(q[c] * k[c] for c in range(d))
    if kind in ("alibi", "alibi_half"):
        # Press et al.'s slopes, worked out by hand: 6 heads = the 4-head sequence 2^-2, 2^-4, 2^-6, 2^-8, then
        # every other slope of the 8-head one (2^-1, 2^-3); alibi_half: a 3-head ALiBi (2^-4, 2^-8, then 2^-2)
        # on heads 0-2, heads 3-5 without position.
        slopes = ([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3] if kind == "alibi"
                  else [2 ** -4, 2 ** -8, 2 ** -2, 0.0, 0.0, 0.0])
        return dot - slopes[h] * (pt - ps)
    return dot  # none, learned, sinusoidal: no position inside attention


def reference_layer(cfg: ModelConfig, layer: CausalSelfAttention, x: torch.Tensor, positions: torch.Tensor):
    """softmax over keys s ≤ t of the reference scores, times v, through the output projection; loops."""
    batch, seq, width = x.shape
    heads, d = cfg.n_heads, width // cfg.n_heads
    qkv = x @ layer.qkv.weight.T
    q, k, v = qkv.split(width, dim=-1)
    out = torch.zeros(batch, seq, width, dtype=torch.float64)
    for b in range(batch):
        pos = positions[b] if positions.dim() == 2 else positions
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            for t in range(seq):
                qt = q[b, t, cols].tolist()
                scores = [reference_score(cfg, layer, h, qt, k[b, s, cols].tolist(), int(pos[t]), int(pos[s]))
                          for s in range(t + 1)]  # causal: keys after t do not exist for query t
                top = max(scores)
                weights = [math.exp(z - top) for z in scores]
                total = sum(weights)
                out[b, t, cols] = sum(w / total * v[b, s, cols] for s, w in enumerate(weights))
    return out @ layer.out.weight.T


# ------------------------------------------------------------------------------------------ one layer, every kind


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("positions", ["arange", "batched"])
def test_attention_layer_matches_reference(variant, positions):
    torch.manual_seed(0)
    cfg = config(variant)
    layer = CausalSelfAttention(cfg).double().eval()
    for p in layer.parameters():  # wide weights, so that positions change the scores visibly
        torch.nn.init.normal_(p, std=0.4)
    x = torch.randn(2, 7, 72, dtype=torch.float64)
    pos = (torch.arange(3, 10) if positions == "arange"
           else torch.sort(torch.randint(0, 60, (2, 7)), dim=-1).values)  # per-sample positions, gaps included
    got = layer(x, pos)
    want = reference_layer(cfg, layer, x, pos)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_future_tokens_change_nothing(variant):
    """Causal masking through the whole model: changing tokens 5.. leaves the logits of 0..4 alone."""
    torch.manual_seed(0)
    model = Transformer(config(variant)).double().eval()
    tokens = torch.randint(0, 40, (2, 9))
    changed = tokens.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 40
    a, b = model(tokens)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 5:], b[:, 5:], atol=1e-6)


def test_positions_matter_where_they_should():
    """In one layer, the last token attends to a set of earlier tokens: without position (none) swapping two of
    them changes nothing, with any encoding it changes the last token's logits. (With more layers the causal mask
    alone leaks order: earlier tokens see different prefixes.)"""
    tokens = torch.tensor([[3, 9, 14, 27, 5]])
    swapped = torch.tensor([[9, 3, 14, 27, 5]])
    for kind in POSITION_KINDS:
        torch.manual_seed(0)
        model = Transformer(config(position=kind, n_layers=1)).double().eval()
        a, b = model(tokens)[0][0, -1], model(swapped)[0][0, -1]
        assert torch.allclose(a, b, atol=1e-10) == (kind == "none"), kind


# ------------------------------------------------------------------------------------------ PoPE ablations


def test_pope_without_delta_has_no_delta_parameter():
    with_delta = Transformer(config("pope"))
    without = Transformer(config("pope_no_delta"))
    assert not any("delta" in name for name, _ in without.named_parameters())
    assert sum("delta" in name for name, _ in with_delta.named_parameters()) == 2  # one per layer
    assert with_delta.num_params() - without.num_params() == 2 * 6 * 12  # layers × heads × head_dim
    rope = Transformer(config("rope"))
    assert without.num_params() == rope.num_params()


def test_pope_magnitudes_differ_and_delta_none_equals_delta_zero():
    """relu and identity change the scores; no δ gives what a δ of exactly 0 gives."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 6, 5, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    pos = torch.arange(5)
    scores = {}
    for magnitude in ("softplus", "relu", "identity"):
        enc = build_qk_encoding("pope", 12, 6, magnitude=magnitude).double()
        q2, k2 = enc(q, k, pos)
        scores[magnitude] = q2 @ k2.transpose(-1, -2)
    assert not torch.allclose(scores["softplus"], scores["relu"])
    assert not torch.allclose(scores["relu"], scores["identity"])
    zero = build_qk_encoding("pope", 12, 6, delta_init="zero").double()
    none = build_qk_encoding("pope", 12, 6, delta="none").double()
    assert none.delta is None
    torch.testing.assert_close(none(q, k, pos)[1], zero(q, k, pos)[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="magnitude"):
        build_qk_encoding("pope", 12, 6, magnitude="exp")


# ------------------------------------------------------------------------------------------ ALiBi


def test_alibi_slopes_follow_press_et_al():
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]  # 2^(-8/8·i)
    assert alibi_slopes(16) == [2.0 ** (-i / 2) for i in range(1, 17)]
    assert alibi_slopes(6) == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    # 12 heads: the 8-head slopes, then the 1st and 3rd ... of the 16-head ones: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5
    assert alibi_slopes(12) == [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)]
    assert alibi_slopes(1) == [2.0 ** -8]
    half = ALiBi(5, half=True).slopes().tolist()  # ⌈5/2⌉ = 3 heads with a 3-head ALiBi, 2 without
    assert half == alibi_slopes(3) + [0.0, 0.0] and alibi_slopes(3) == [2.0 ** -4, 2.0 ** -8, 2.0 ** -2]
    assert ALiBi(1, half=True).slopes().tolist() == [2.0 ** -8]


def test_alibi_and_sinusoidal_read_beyond_max_seq_len_and_only_alibi_leaves_the_fast_path():
    torch.manual_seed(0)
    for kind in ("alibi", "sinusoidal"):
        model = Transformer(config(position=kind)).eval()
        logits, _ = model(torch.randint(0, 40, (1, 40)))  # max_seq_len is 16
        assert torch.isfinite(logits).all()
    assert not Transformer(config("rope")).blocks[0].attn.uses_alibi  # rope/pope go through is_causal
    assert Transformer(config(position="alibi_half")).blocks[0].attn.uses_alibi


# ------------------------------------------------------------------------------------------ sinusoidal


def test_sinusoidal_table_is_vaswani_divided_by_sqrt_d():
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)), over √d; odd d_model included."""
    for d_model, heads in ((16, 4), (15, 3)):
        torch.manual_seed(0)
        model = Transformer(config(position="sinusoidal", d_model=d_model, n_heads=heads)).double().eval()
        tokens = torch.randint(0, 40, (1, 6))
        positions = torch.tensor([0, 1, 2, 50, 1000, 5000])
        got = (model._embed(tokens, positions) - model.embed.weight[tokens]).detach()
        for row, p in enumerate(positions.tolist()):
            for j in range(d_model):
                i = j // 2
                angle = p / 10000 ** (2 * i / d_model)
                want = (math.sin(angle) if j % 2 == 0 else math.cos(angle)) / math.sqrt(d_model)
                assert abs(float(got[0, row, j]) - want) < 1e-12, (d_model, p, j)
    assert not any(p.requires_grad and "sinus" in n for n, p in model.named_parameters())


# ------------------------------------------------------------------------------------------ rope_half


def test_rope_half_rotates_the_first_half_only():
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 7, 12, generator=gen, dtype=torch.float64) for _ in range(2))
    enc = build_qk_encoding("rope_half", 12, 2)
    assert isinstance(enc, RoPE) and enc.rotary_dim == 6
    q2, _ = enc(q, k, torch.arange(100, 107))
    torch.testing.assert_close(q2[..., 6:], q[..., 6:], rtol=0, atol=0)
    assert not torch.allclose(q2[..., :6], q[..., :6])
    torch.testing.assert_close(q2[..., :6].norm(dim=-1), q[..., :6].norm(dim=-1))  # a rotation
    with pytest.raises(ValueError, match="divisible by 4"):
        build_qk_encoding("rope_half", 6, 2)
    with pytest.raises(ConfigError, match="rope_half.*divisible by 4; got 6"):
        validate(dataclasses.replace(Config(), model=ModelConfig(d_model=36, n_heads=6, position="rope_half")))


# ------------------------------------------------------------------------------------------ YaRN


def test_yarn_frequencies_match_the_paper_by_hand():
    """head_dim 16 at base 10000: θ_j = 10000^(-j/8); s = 4, L = 64, α = 1, β = 32.
    r_j = L·θ_j/2π: j=0 → 10.186 (γ = 0.2963), j=1 → 3.221 (γ = 0.0716), j=2 → 1.0186 (γ = 0.0006), j ≥ 3 → r < 1
    (γ = 0, θ/4). With L = 4096 the first three have r > 32 (γ = 1, θ kept)."""
    theta = [10000 ** (-j / 8) for j in range(8)]
    rope = RoPE(16, yarn=Yarn(4.0, 64))
    got = rope._theta.get(torch.device("cpu"), torch.float64).tolist()
    r0 = 64 / (2 * math.pi)
    gamma0 = (r0 - 1) / 31
    assert got[0] == pytest.approx((1 - gamma0) / 4 + gamma0, rel=1e-12)  # θ_0 = 1
    assert gamma0 == pytest.approx(0.29632, abs=1e-5)
    r1 = 64 * theta[1] / (2 * math.pi)
    assert got[1] == pytest.approx((1 - (r1 - 1) / 31) * theta[1] / 4 + (r1 - 1) / 31 * theta[1], rel=1e-12)
    for j in range(3, 8):
        assert got[j] == pytest.approx(theta[j] / 4, rel=1e-12)
    long = RoPE(16, yarn=Yarn(4.0, 4096))._theta.get(torch.device("cpu"), torch.float64).tolist()
    for j in range(3):  # r = 4096·θ/2π = 652, 206, 65: all above β
        assert long[j] == pytest.approx(theta[j], rel=1e-12)
    assert 4096 * theta[3] / TWO_PI < 32 and long[3] < theta[3]
    for j in range(8):
        assert got[j] == pytest.approx(yarn_theta(theta[j], 4.0, 64, 1.0, 32.0), rel=1e-12)


@pytest.mark.parametrize("kind", ["rope", "rope_half"])
def test_yarn_temperature_scales_logits_by_square_of_0_1_ln_s_plus_1(kind):
    """At equal positions the rotations cancel, so YaRN's logits are (0.1·ln s + 1)² times the plain ones."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 5, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    same = torch.full((5,), 77)
    plain = build_qk_encoding(kind, 8, 2)
    for s in (2.0, 4.0, 16.0):
        yarn = build_qk_encoding(kind, 8, 2, yarn=Yarn(s, 32))
        want = (0.1 * math.log(s) + 1) ** 2 * (q @ k.transpose(-1, -2))
        q2, k2 = yarn(q, k, same)
        torch.testing.assert_close(q2 @ k2.transpose(-1, -2), want, rtol=1e-12, atol=1e-12)
        q3, k3 = plain(q, k, same)
        torch.testing.assert_close(q3 @ k3.transpose(-1, -2), q @ k.transpose(-1, -2), rtol=1e-12, atol=1e-12)


def test_yarn_config_checks_and_eval_overrides():
    model = config("rope")
    scaled = apply_model_overrides(model, ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=8"])
    assert scaled.rope_scaling == RopeScalingConfig(type="yarn", factor=8.0)
    assert dataclasses.replace(scaled, rope_scaling=model.rope_scaling) == model  # nothing else changed
    assert apply_model_overrides(model, ["model.position_base=500000"]).position_base == 500000.0
    cases = [
        (config("pope"), ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4"],
         "yarn scales RoPE frequencies; model.position=pope has none"),
        (model, ["model.rope_scaling.type=yarn"], "model.rope_scaling.factor' must be > 1"),
        (model, ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4", "model.rope_scaling.alpha=40"],
         "alpha' (40.0) must be >= 0 and below beta (32.0)"),
        (model, ["model.d_model=64"], "only model.rope_scaling.* and model.position_base can change"),
        (model, ["optim.lr=1"], "only model.rope_scaling.* and model.position_base can change"),
        (model, ["model.rope_scaling.kind=yarn"], "unknown config key 'model.rope_scaling.kind'"),
    ]
    for cfg, overrides, message in cases:
        with pytest.raises(ConfigError) as err:
            apply_model_overrides(cfg, overrides)
        assert message in str(err.value) and "\n" not in str(err.value)
    # 0: the model's max_seq_len is the trained context
    from pipeline.model import yarn_of

    assert yarn_of(scaled) == Yarn(8.0, 16, 1.0, 32.0)
    assert yarn_of(model) is None


# ------------------------------------------------------------------------------------------ training, params


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_few_training_steps_lower_the_loss(variant):
    torch.manual_seed(0)
    model = Transformer(config(variant, d_model=24, n_heads=2, init_std=0.02, max_seq_len=32))
    tokens = torch.randint(0, 40, (4, 17))
    optimizer = torch.optim.AdamW(model.param_groups(0.01), lr=3e-3)
    losses = []
    for _ in range(6):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_parameter_counts():
    counts = {kind: Transformer(config(position=kind)).num_params() for kind in POSITION_KINDS}
    base = counts["none"]
    for kind in ("rope", "rope_half", "alibi", "alibi_half", "sinusoidal"):
        assert counts[kind] == base, kind  # no parameters of their own
    assert counts["pope"] == base + 2 * 6 * 12  # δ: layers × heads × head_dim
    assert counts["learned"] == base + 16 * 72  # max_seq_len × d_model
    yarn = Transformer(config("rope_yarn")).num_params()
    assert yarn == base


# ------------------------------------------------------------------------------------------ old checkpoints


OLD_MODEL = {"vocab_size": 40, "d_model": 72, "n_heads": 6, "n_layers": 2, "max_seq_len": 16, "dropout": 0.0,
             "bias": False, "mlp_ratio": 4, "position": "pope", "position_base": 10000.0,
             "pope_delta_init": "zero", "norm_eps": 1e-5, "init_std": 0.02}  # written before the new keys


def test_old_model_records_load_with_defaults(tmp_path):
    cfg = model_config_from_dict(OLD_MODEL)
    assert cfg == ModelConfig(**OLD_MODEL)
    assert cfg.pope_magnitude == "softplus" and cfg.pope_delta == "learned" and cfg.rope_scaling.type == "none"
    new = model_config_from_dict(dataclasses.asdict(config("rope_yarn")))
    assert isinstance(new.rope_scaling, RopeScalingConfig) and new.rope_scaling.factor == 4.0

    from pipeline.checkpoint import MARKER, Checkpointer, tag_for
    from pipeline.distributed import DistEnv
    from pipeline.state import RunIdentity

    def identity(model: ModelConfig) -> RunIdentity:  # as train.py records it; the old record holds the model only
        return RunIdentity(model=model_identity(model), dataset="d", world_size=1, zero_stage=2,
                           windows_per_sample=1, init=None)

    folder = tmp_path / "checkpoints"
    (folder / tag_for(10)).mkdir(parents=True)
    (folder / tag_for(10) / MARKER).write_text(json.dumps({"identity": {"model": OLD_MODEL}}))
    same = Checkpointer(folder, DistEnv(), 1, identity(ModelConfig(**OLD_MODEL)))
    same.check_identity(10)  # the old record, filled with defaults, is this model
    for changed in ({"pope_delta": "none"}, {"d_model": 48}):
        other = Checkpointer(folder, DistEnv(), 1, identity(ModelConfig(**{**OLD_MODEL, **changed})))
        with pytest.raises(ValueError, match=f"model.{next(iter(changed))}"):
            other.check_identity(10)
