"""The transformer: causality, forward/backward, parameter counts of the paper's sizes, optimizer groups."""

import math

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model import IGNORE_INDEX, Transformer
from pipeline.positional import POSITION_KINDS, PoPE

KINDS = list(POSITION_KINDS)  # every model.position; tests/test_encodings.py checks each against its formula


def tiny(position, **kw):
    cfg = dict(vocab_size=50, d_model=32, n_heads=4, n_layers=2, max_seq_len=16, position=position,
               pope_delta_init="uniform")
    cfg.update(kw)
    return ModelConfig(**cfg)


@pytest.mark.parametrize("position", KINDS)
def test_causality(position):
    torch.manual_seed(0)
    model = Transformer(tiny(position)).double().eval()
    tokens = torch.randint(0, 50, (2, 12))
    changed = tokens.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 50
    a, _ = model(tokens)
    b, _ = model(changed)
    assert torch.allclose(a[:, :8], b[:, :8], atol=1e-12)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-6)


@pytest.mark.parametrize("position", KINDS)
def test_forward_backward(position):
    torch.manual_seed(0)
    model = Transformer(tiny(position, dropout=0.1))
    tokens = torch.randint(0, 50, (3, 16))
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = IGNORE_INDEX
    logits, loss = model(tokens, targets)
    assert logits.shape == (3, 16, 50)
    assert abs(loss.item() - math.log(50)) < 0.5  # near uniform at initialisation
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    deltas = [m.delta for m in model.modules() if isinstance(m, PoPE)]
    assert len(deltas) == (2 if position == "pope" else 0)  # one δ per layer
    assert all(d.grad.abs().sum() > 0 for d in deltas)


def test_loss_ignores_masked_targets():
    torch.manual_seed(0)
    model = Transformer(tiny("pope")).eval()
    tokens = torch.randint(0, 50, (2, 10))
    last_only = torch.full_like(tokens, IGNORE_INDEX)
    last_only[:, -1] = tokens[:, 0]
    logits, loss = model(tokens, last_only)
    want = torch.nn.functional.cross_entropy(logits[:, -1], tokens[:, 0])
    assert torch.allclose(loss, want)


def test_tied_embeddings_and_learned_table():
    model = Transformer(tiny("learned"))
    names = {n for n, _ in model.named_parameters()}
    assert "embed.weight" in names and "learned_positions.embedding.weight" in names
    assert not any("head" in n for n in names)  # output head is the token embedding
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_positions_override_matches_default():
    torch.manual_seed(0)
    model = Transformer(tiny("pope")).double().eval()
    tokens = torch.randint(0, 50, (2, 9))
    a, _ = model(tokens)
    b, _ = model(tokens, positions=torch.arange(9).expand(2, 9))
    c, _ = model(tokens, positions=torch.arange(100, 109))  # relative encodings: shift-invariant
    assert torch.allclose(a, b) and torch.allclose(a, c, atol=1e-9)


PAPER_SIZES = [(124e6, 768, 12, 12), (253e6, 1024, 16, 16), (774e6, 1280, 20, 36)]


@pytest.mark.parametrize("target,width,heads,layers", PAPER_SIZES)
@pytest.mark.parametrize("position", ["pope", "rope"])
def test_parameter_counts_match_paper(target, width, heads, layers, position):
    with torch.device("meta"):
        model = Transformer(ModelConfig(vocab_size=50257, d_model=width, n_heads=heads, n_layers=layers,
                                        max_seq_len=1024, position=position))
    count = model.num_params()
    assert abs(count - target) / target < 0.01, f"{count:,} vs {target:,.0f}"


def test_weight_decay_groups():
    model = Transformer(tiny("pope", bias=True))
    decay, no_decay = model.param_groups(0.01)
    decayed = {id(p) for p in decay["params"]}
    named = dict(model.named_parameters())
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    for name, param in named.items():
        should_decay = name.endswith("weight") and param.dim() == 2 and "embed" not in name
        assert (id(param) in decayed) == should_decay, name
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)


def test_flops_per_token_counts_pope_wider_qk():
    rope, pope = Transformer(tiny("rope")), Transformer(tiny("pope"))
    layers, heads, head_dim, width, seq, vocab = 2, 4, 8, 32, 16, 50
    matmul = vocab * width + layers * (3 * width * width + width * width + 2 * 4 * width * width)
    # 6N + 12·L·H·Q·T for RoPE; PoPE's q/k are twice as wide: 6N + 18·L·H·Q·T
    assert rope.flops_per_token(seq) == 6 * matmul + 12 * layers * heads * head_dim * seq
    assert pope.flops_per_token(seq) == 6 * matmul + 18 * layers * heads * head_dim * seq
