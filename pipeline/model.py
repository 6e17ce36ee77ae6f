"""A decoder-only transformer with a pluggable position encoding (`model.position`, pipeline/positional.py).

Pre-norm blocks with RMSNorm, causal self-attention through PyTorch's scaled_dot_product_attention (or, for PoPE,
the fused Triton kernel of pipeline/kernels: `model.attention_impl`), a 4x GELU MLP,
dropout on embeddings, attention weights and residual branches, and a token embedding tied to the output head.
Initialisation follows GPT-2: N(0, 0.02) everywhere, with the projections that write into the residual stream
scaled down by 1/sqrt(2·n_layers) so the stream's variance does not grow with depth.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import kernels
from pipeline.positional import (ALiBi, LearnedPositions, PoPE, SinusoidalPositions, Yarn, build_qk_encoding,
                                 qk_width)

if TYPE_CHECKING:  # annotations only: the model reads its config by attribute, so `pope export` can ship this file
    from pipeline.config import ModelConfig  # to Hugging Face with a config of its own (pipeline/hf_export.py)

IGNORE_INDEX = -100  # targets with this value contribute no loss (padding, or every token but the last)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     dropout_p: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias + causal mask)·v through SDPA; q, k may be wider than v (PoPE: 2·head_dim).

    Which SDPA backends take a v narrower than q/k: the math backend (CPU and CUDA) and CUDA's memory-efficient
    kernel do; the flash kernels (CPU's, and CUDA's FlashAttention-2) require one last dimension for q, k and v
    and are skipped otherwise. Measured on a 2-core CPU (torch 2.13, B=4, H=12, T=1024, fwd+bwd): math with
    q/k 128, v 64 took 0.92 s, flash with v zero-padded to 128 took 0.47 s (RoPE's 64/64 flash: 0.34 s). So v is
    zero-padded to the width of q/k and the padded half of the output dropped: zero columns of v give zero
    output columns and change nothing else, and the fastest kernel stays available on every device.

    `bias` (ALiBi only; (batch|1, heads, T, T), added to the logits): it becomes a float attn_mask that also holds
    the causal −inf, which takes SDPA off the flash kernels and costs heads·T² floats per layer while it lives
    (12 heads at T = 10,240 in fp32: 5 GB). Without a bias, the is_causal fast path is used.
    """
    width = v.shape[-1]
    if q.shape[-1] != width:
        v = F.pad(v, (0, q.shape[-1] - width))
    if bias is None:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    else:
        seq = q.shape[-2]
        future = torch.ones(seq, seq, dtype=torch.bool, device=q.device).triu(diagonal=1)
        mask = bias.masked_fill(future, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out[..., :width]


class LayerCache:
    """One attention layer's keys and values of the tokens seen so far, for incremental decoding.

    Keys are stored *after* the position encoding (PoPE: the 2·head_dim-wide Cartesian vectors with the key phase
    s·θ + δ already applied; RoPE: rotated), so each step encodes only its new tokens. Values are stored zero-padded
    to the key width, ready for SDPA's flash kernel (see causal_attention). The keys' positions are kept too, for
    ALiBi's bias against absolute key positions. Buffers are preallocated and grow by doubling: concatenating each
    step would copy the whole cache every token.
    """

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None  # (batch, heads, capacity, qk width)
        self.values: torch.Tensor | None = None  # (batch, heads, capacity, qk width)
        self.positions: torch.Tensor | None = None  # (batch, capacity) int64
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the new tokens' k, v (v already padded to k's width) and positions ((seq,) or (batch, seq));
        return every cached key, value and key position."""
        new = k.shape[-2]
        end = self.length + new
        positions = positions.expand(k.shape[0], new)
        if self.keys is None or end > self.keys.shape[-2]:
            capacity = max(end, 2 * (self.keys.shape[-2] if self.keys is not None else 0), 64)
            keys = k.new_zeros(*k.shape[:-2], capacity, k.shape[-1])
            values = v.new_zeros(*v.shape[:-2], capacity, v.shape[-1])
            stored = positions.new_zeros(k.shape[0], capacity)
            if self.keys is not None:
                keys[..., :self.length, :] = self.keys[..., :self.length, :]
                values[..., :self.length, :] = self.values[..., :self.length, :]
                stored[:, :self.length] = self.positions[:, :self.length]
            self.keys, self.values, self.positions = keys, values, stored
        self.keys[..., self.length:end, :] = k
        self.values[..., self.length:end, :] = v
        self.positions[:, self.length:end] = positions
        self.length = end
        return self.keys[..., :end, :], self.values[..., :end, :], self.positions[:, :end]


class KVCache:
    """Every layer's LayerCache; `length` is the number of tokens the model has seen (the next token's position).

    Pass the same KVCache to successive `Transformer.forward(tokens, cache=...)` calls: the first with the prompt,
    then one token (or more) at a time; positions continue from `length` unless given.
    """

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerCache() for _ in range(n_layers)]

    def reorder_cache(self, rows: torch.Tensor) -> None:
        """Keep the batch rows `rows` (indices, repeats allowed) of every layer: beam search reorders its beams
        (the name is the one transformers' generate calls on a cache)."""
        for layer in self.layers:
            if layer.keys is not None:
                rows = rows.to(layer.keys.device)
                layer.keys, layer.values = layer.keys[rows], layer.values[rows]
                layer.positions = layer.positions[rows]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cache: LayerCache,
                     positions: torch.Tensor, alibi: ALiBi | None = None) -> torch.Tensor:
    """Attention of the new queries (at `positions`) to the cached keys plus the new ones (inference only).

    With an empty cache this is causal_attention. A single new token sees every key, so no mask at all
    (is_causal=False). Several new tokens after a cache (a prefill) need an explicit mask: SDPA's is_causal aligns
    the mask to the top-left corner, which for fewer queries than keys would hide the cache from them. ALiBi adds
    its bias against the cached keys' positions, in the same float mask.
    """
    width = v.shape[-1]
    past, new = cache.length, q.shape[-2]
    if q.shape[-1] != width:
        v = F.pad(v, (0, q.shape[-1] - width))
    keys, values, key_positions = cache.append(k, v, positions)
    if alibi is None and (past == 0 or new == 1):
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=past == 0 and new > 1, scale=scale)
    else:
        # query i sits at index past + i and sees keys 0 .. past + i
        visible = torch.ones(new, past + new, dtype=torch.bool, device=q.device).tril(diagonal=past)
        if alibi is None:
            mask = visible
        else:
            mask = alibi.bias(positions, key_positions, q.dtype).masked_fill(~visible, float("-inf"))
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out[..., :width]


def yarn_of(cfg: ModelConfig) -> Yarn | None:
    """The config's YaRN (original context 0 meaning model.max_seq_len), or None."""
    y = cfg.rope_scaling
    if y.type != "yarn":
        return None
    return Yarn(y.factor, y.original_max_seq_len or cfg.max_seq_len, y.alpha, y.beta)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        # Each layer owns its encoding: PoPE's δ is per layer, head and frequency.
        self.position = build_qk_encoding(cfg.position, self.head_dim, cfg.n_heads, cfg.position_base,
                                          cfg.pope_delta_init, magnitude=cfg.pope_magnitude, delta=cfg.pope_delta,
                                          yarn=yarn_of(cfg))
        self.uses_alibi = isinstance(self.position, ALiBi)  # its bias goes into attention, not into q/k
        # 1/sqrt of the *original* head dim for every encoding, also for PoPE's 2·head_dim-wide q/k.
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.attention_impl = cfg.attention_impl if isinstance(self.position, PoPE) else "sdpa"

    def use_fused(self, q: torch.Tensor) -> bool:
        """Fused PoPE attention (pipeline/kernels) for this call? `fused` insists (a one-line ValueError when it
        cannot run), `auto` takes it on CUDA when it can, `sdpa` never. Decided per call because the device,
        dtype and train/eval mode are only known here."""
        if self.attention_impl == "sdpa":
            return False
        reason = kernels.fused_unsupported(q, self.training and self.dropout > 0,
                                           allow_interpreter=self.attention_impl == "fused")
        if reason is not None and self.attention_impl == "fused":
            raise ValueError(f"model.attention_impl=fused cannot run: {reason}; use auto or sdpa")
        return reason is None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = (t.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).split(width, dim=2))
        # The fused kernel encodes q and k itself; the KV-cache path (generation) stays on the reference.
        if cache is None and self.use_fused(q):
            pos, theta, delta = self.position(q, k, positions, fused_inputs=True)
            y = kernels.fused_pope_attention(q, k, v, theta, delta, pos, self.scale, self.position.magnitude)
            return self.resid_dropout(self.out(y.transpose(1, 2).reshape(batch, seq, width)))
        q, k = self.position(q, k, positions)
        if cache is None:
            bias = self.position.bias(positions, positions, q.dtype) if self.uses_alibi else None
            y = causal_attention(q, k, v, self.scale, self.dropout if self.training else 0.0, bias)
        else:
            y = cached_attention(q, k, v, self.scale, cache, positions, self.position if self.uses_alibi else None)
        y = y.transpose(1, 2).reshape(batch, seq, width)
        return self.resid_dropout(self.out(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.out = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.out(F.gelu(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), positions, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """forward(tokens, targets=None, positions=None, cache=None) -> (logits, loss or None).

    With a KVCache (pipeline/generate.py), attention reads the keys and values of the tokens seen before and stores
    the new ones; positions then default to continuing after them."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.learned_positions = LearnedPositions(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        self.sinusoidal = (SinusoidalPositions(cfg.d_model, cfg.position_base) if cfg.position == "sinusoidal"
                           else None)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(".out") else self.cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Token embeddings plus the absolute positions, if the encoding is one (learned, sinusoidal), dropped out.

        Every other encoding, and sinusoidal, computes any position, so it reads past model.max_seq_len (length
        extrapolation); a learned table has no row beyond it."""
        if self.learned_positions is not None and int(positions.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(positions.max())} is beyond what learned absolute positions know "
                             f"(model.max_seq_len={self.cfg.max_seq_len})")
        x = self.embed(tokens)
        if self.learned_positions is not None:
            x = x + self.learned_positions(positions)
        if self.sinusoidal is not None:
            x = x + self.sinusoidal(positions, x.dtype).to(x.dtype)
        return self.embed_dropout(x)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        seq = tokens.shape[1]
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + seq, device=tokens.device)
        x = self._embed(tokens, positions)
        if cache is None:
            for block in self.blocks:
                x = block(x, positions)
        else:
            if len(cache.layers) != len(self.blocks):
                raise ValueError(f"the KV cache has {len(cache.layers)} layers; the model has {len(self.blocks)}")
            for block, layer_cache in zip(self.blocks, cache.layers):
                x = block(x, positions, layer_cache)
        logits = F.linear(self.final_norm(x), self.embed.weight)  # tied output head
        if targets is None:
            return logits, None
        flat = targets.reshape(-1)
        # The mean over the targets there are; a batch without any (only padding windows, pipeline/data.py) has
        # loss 0 and no gradient, where the built-in mean would make both NaN and stop the run.
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX,
                               reduction="sum") / (flat != IGNORE_INDEX).sum().clamp(min=1)
        return logits, loss

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters; with exclude_embeddings, without the token (and learned position) tables."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed.weight.numel()
            if self.learned_positions is not None:
                total -= self.learned_positions.embedding.weight.numel()
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3 × forward), for MFU.

        The PaLM/nanoGPT convention: 6·N for the matrix multiplies (N: the linear layers' weights and the tied
        output head; norms, biases, δ and the learned position table are not matmuls) plus 6·layers·heads·seq·(qk width + v width) for attention, which is
        the usual 12·L·H·Q·T for RoPE; PoPE's qk width is 2·head_dim. The zero-padding of v is an implementation
        detail and is not counted as useful work.
        """
        cfg = self.cfg
        head_dim = cfg.d_model // cfg.n_heads
        matmul_params = self.embed.weight.numel() + sum(
            m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attention = 6 * cfg.n_layers * cfg.n_heads * seq_len * (qk_width(cfg.position, head_dim) + head_dim)
        return 6.0 * matmul_params + attention

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on the linear layers' weight matrices only.

        Norm gains, biases, PoPE's δ (a phase, where shrinking towards 0 would be a prior on position rather than
        a regulariser) and the embeddings (a lookup table whose rows see few updates) get no weight decay.
        """
        decay, no_decay = [], []
        decayed = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        for param in self.parameters():
            (decay if id(param) in decayed else no_decay).append(param)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The final-norm outputs (batch, seq, d_model): what the tied output head projects to logits.

        `forward` without the projection, for callers that score long sequences: projecting and log-softmaxing a
        chunk of positions at a time never holds seq × vocab logits at once (10,240 × 50,257 in fp32 is 2 GB).
        Kept apart from `forward` on purpose (they share only `_embed`), so neither changes the other.
        """
        seq = tokens.shape[1]
        if positions is None:
            positions = torch.arange(seq, device=tokens.device)
        x = self._embed(tokens, positions)
        for block in self.blocks:
            x = block(x, positions)
        return self.final_norm(x)
