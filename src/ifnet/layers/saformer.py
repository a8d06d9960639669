"""SAFormer: a pre-norm Transformer encoder/decoder whose attention is linear (or softmax, for ablation).

The maths lives in ``ifnet.layers.attention``; this file holds the parameters and the wiring.
The decoder has two entry points that the tests hold equal: ``forward`` (teacher forcing, the
whole target at once) and ``init_state`` + ``step`` (one token at a time, for decoding). With
linear attention a step costs the same at every position: self-attention keeps a fixed-size
``(S, z)`` state per layer and head, and cross-attention reads a summary of the memory computed
once in ``init_state``. With softmax attention self-attention keeps a growing key/value cache.

Positional information is the caller's job: ``forward`` and ``step`` take already-embedded
tokens. ``sinusoidal_positions`` is provided for callers that want the classic table.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ifnet.errors import IFNetError
from ifnet.layers import attention as attn

Tensor = torch.Tensor
ATTENTION_KINDS = ("linear", "softmax")


class ConfigError(IFNetError, ValueError):
    """An impossible model setting (reaches the user as one line)."""


@dataclass
class SAFormerConfig:
    d_model: int = 512  # R2Gen's width: keeps IU-Xray / MIMIC-CXR results comparable with published baselines
    num_heads: int = 8  # 64 dims per head, the usual Transformer head size
    num_encoder_layers: int = 3  # R2Gen depth; IU-Xray has ~2k training reports, deeper overfits
    num_decoder_layers: int = 3  # as above
    # 512 rather than the 4x = 2048 of "Attention is all you need": R2Gen/R2GenCMN use 512, and with
    # ~2-3k IU-Xray training reports the 4x FFN adds 6M parameters that mostly overfit.
    d_ff: int = 512
    dropout: float = 0.1  # residual and FFN dropout, R2Gen's value (no attention-map dropout: see docs)
    attention: str = "linear"  # "linear" (elu+1 feature map) or "softmax" (SDPA), for the ablation
    # Train causal linear attention in chunks of this size; None = parallel form. Same result; 64 is as fast at
    # N <= 64 and faster from N ~ 256 on, and needs O(N) not O(N^2) memory (docs/BENCH_ATTENTION.md).
    chunk_size: Optional[int] = None
    eps: float = attn.DEFAULT_EPS  # guards the linear-attention normaliser; only a fully masked row reaches it

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KINDS:
            raise ConfigError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be None or >= 1, got {self.chunk_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        for name in ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers", "d_ff"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")


def sinusoidal_positions(n: int, d: int, *, dtype: torch.dtype = torch.float32,
                         device: Optional[torch.device] = None) -> Tensor:
    """The fixed sine/cosine position table of Vaswani et al.: [n, d], row p encodes position p."""
    position = torch.arange(n, dtype=torch.float64, device=device).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float64, device=device) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d, dtype=torch.float64, device=device)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d // 2])
    return table.to(dtype)


# --------------------------------------------------------------------------------------------
# Decoder state for incremental decoding
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderState:
    """Everything ``SAFormerDecoder.step`` needs, one entry per layer; immutable.

    ``self_attention[i]``: linear ``(S [B, H, d, d], z [B, H, d])`` or softmax ``(K, V)`` [B, H, t, d]
    (``t`` grows by one per step). ``cross_attention[i]``: linear summary ``(S, z)`` of the memory, or
    softmax ``(K, V, memory_mask)``. ``length`` counts the tokens consumed so far: the position of
    the next token, for the caller's positional encoding.
    """

    self_attention: Tuple[Tuple[Tensor, ...], ...]
    cross_attention: Tuple[Tuple[Tensor, ...], ...]
    length: int = 0

    @property
    def batch_size(self) -> int:
        return self.cross_attention[0][0].shape[0]

    def index_select(self, idx: Tensor) -> "DecoderState":
        """Rows ``idx`` [B'] of every tensor (beam expansion / reordering); returns a new state."""
        def pick(group):
            return tuple(tuple(t.index_select(0, idx) for t in entry) for entry in group)

        return DecoderState(pick(self.self_attention), pick(self.cross_attention), self.length)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """Projections around the pure attention functions; ``kind`` is "linear" or "softmax"."""

    def __init__(self, cfg: SAFormerConfig) -> None:
        super().__init__()
        self.kind = cfg.attention
        self.num_heads = cfg.num_heads
        self.chunk_size = cfg.chunk_size
        self.eps = cfg.eps
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)

    def _heads(self, x: Tensor) -> Tensor:  # [B, N, D] -> [B, H, N, D / H]
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, -1).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:  # [B, H, N, D / H] -> [B, N, D]
        b, _, n, _ = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(b, n, -1))

    def _heads_step(self, x: Tensor) -> Tensor:  # [B, D] -> [B, H, D / H]
        return x.view(x.shape[0], self.num_heads, -1)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, key_mask: Optional[Tensor] = None,
                *, causal: bool = False) -> Tensor:
        """x [B, N, D] attends to ``context`` [B, S, D] (default: itself); key_mask [B, S] True = valid."""
        context = x if context is None else context
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(context)), self._heads(self.v_proj(context))
        if self.kind == "softmax":
            out = attn.softmax_attention(q, k, v, key_mask, causal=causal)
        elif not causal:
            out = attn.linear_attention(q, k, v, key_mask, eps=self.eps)
        elif self.chunk_size is not None:
            out = attn.causal_linear_attention_chunked(q, k, v, self.chunk_size, key_mask, eps=self.eps)
        else:
            out = attn.causal_linear_attention(q, k, v, key_mask, eps=self.eps)
        return self._merge(out)

    def empty_cache(self, batch: int, like: Tensor) -> Tuple[Tensor, ...]:
        """The causal self-attention state before the first token."""
        head_dim = like.shape[-1] // self.num_heads
        if self.kind == "linear":
            return attn.init_linear_state(batch, self.num_heads, head_dim, head_dim, dtype=like.dtype,
                                          device=like.device)
        empty = like.new_zeros(batch, self.num_heads, 0, head_dim)
        return empty, empty

    def step(self, x_t: Tensor, cache: Tuple[Tensor, ...]) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """Causal self-attention for one token x_t [B, D]; returns ([B, D], new cache)."""
        q, k, v = (self._heads_step(p(x_t)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.kind == "linear":
            out, cache = attn.linear_attention_step(q, k, v, cache, eps=self.eps)
        else:
            out, cache = attn.softmax_attention_step(q, k, v, cache)
        return self.out_proj(out.reshape(x_t.shape[0], -1)), cache

    def summarize(self, context: Tensor, key_mask: Tensor) -> Tuple[Tensor, ...]:
        """What cross-attention needs of the memory, computed once per report."""
        k, v = self._heads(self.k_proj(context)), self._heads(self.v_proj(context))
        if self.kind == "linear":
            return attn.linear_attention_summary(k, v, key_mask)
        return k, v, key_mask

    def read(self, x_t: Tensor, summary: Tuple[Tensor, ...]) -> Tensor:
        """Cross-attention of one token x_t [B, D] to a ``summarize``d memory -> [B, D]."""
        q = self._heads_step(self.q_proj(x_t))
        if self.kind == "linear":
            out = attn.linear_attention_readout(q, summary, eps=self.eps)
        else:
            k, v, key_mask = summary
            out = attn.softmax_attention(q.unsqueeze(-2), k, v, key_mask).squeeze(-2)
        return self.out_proj(out.reshape(x_t.shape[0], -1))


class FeedForward(nn.Module):
    """Position-wise Linear-ReLU-Linear, R2Gen's choice (ReLU keeps the ablation against it clean)."""

    def __init__(self, cfg: SAFormerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Pre-norm: x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, cfg: SAFormerConfig) -> None:
        super().__init__()
        self.norm_attn, self.norm_ff = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.self_attn, self.ff = MultiHeadAttention(cfg), FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: Optional[Tensor]) -> Tensor:
        x = x + self.dropout(self.self_attn(self.norm_attn(x), key_mask=mask))
        return x + self.dropout(self.ff(self.norm_ff(x)))


class DecoderLayer(nn.Module):
    """Pre-norm: causal self-attention, cross-attention to the memory, FFN; each with a residual."""

    def __init__(self, cfg: SAFormerConfig) -> None:
        super().__init__()
        self.norm_self, self.norm_cross, self.norm_ff = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attn, self.cross_attn, self.ff = MultiHeadAttention(cfg), MultiHeadAttention(cfg), FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, y: Tensor, memory: Tensor, memory_mask: Optional[Tensor], tgt_mask: Optional[Tensor]) -> Tensor:
        y = y + self.dropout(self.self_attn(self.norm_self(y), key_mask=tgt_mask, causal=True))
        y = y + self.dropout(self.cross_attn(self.norm_cross(y), memory, memory_mask))
        return y + self.dropout(self.ff(self.norm_ff(y)))

    def step(self, y_t: Tensor, cache: Tuple[Tensor, ...], summary: Tuple[Tensor, ...]):
        out, cache = self.self_attn.step(self.norm_self(y_t), cache)
        y_t = y_t + self.dropout(out)
        y_t = y_t + self.dropout(self.cross_attn.read(self.norm_cross(y_t), summary))
        return y_t + self.dropout(self.ff(self.norm_ff(y_t))), cache


def _init_weights(module: nn.Module) -> None:
    # Xavier-uniform on every matrix, as R2Gen (and nn.Transformer) do; biases stay zero-ish defaults.
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SAFormerEncoder(nn.Module):
    """Stack of ``num_encoder_layers`` pre-norm layers with a final LayerNorm."""

    def __init__(self, cfg: SAFormerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        _init_weights(self)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x [B, S, D], mask [B, S] bool True = valid -> [B, S, D].

        Masked positions never influence valid ones; their own outputs are meaningless.
        """
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


class SAFormerDecoder(nn.Module):
    """Stack of ``num_decoder_layers`` pre-norm layers with a final LayerNorm.

    Pre-norm (as in R2Gen's own Transformer, and GPT-2): the residual path stays an identity, so
    training is stable without a long warm-up, and the final LayerNorm bounds the output scale.
    """

    def __init__(self, cfg: SAFormerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        _init_weights(self)

    def forward(self, y: Tensor, memory: Tensor, memory_mask: Optional[Tensor] = None,
                tgt_mask: Optional[Tensor] = None) -> Tensor:
        """Teacher forcing. y [B, T, D] (embedded, positions included), memory [B, S, D] -> [B, T, D].

        ``memory_mask`` [B, S] and ``tgt_mask`` [B, T]: bool, True = valid. Targets are right-padded;
        causality alone then keeps padding away from valid positions, so ``tgt_mask=None`` gives the
        same valid outputs (and, for softmax, the faster ``is_causal`` kernel). With a mask, padded
        keys are excluded whatever the padding pattern.
        """
        for layer in self.layers:
            y = layer(y, memory, memory_mask, tgt_mask)
        return self.norm(y)

    def init_state(self, memory: Tensor, memory_mask: Optional[Tensor] = None) -> DecoderState:
        """Per-layer memory summaries and empty self-attention states for ``step``."""
        if memory_mask is None:
            memory_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        batch = memory.shape[0]
        caches: List[Tuple[Tensor, ...]] = []
        summaries: List[Tuple[Tensor, ...]] = []
        for layer in self.layers:
            caches.append(layer.self_attn.empty_cache(batch, memory))
            summaries.append(layer.cross_attn.summarize(memory, memory_mask))
        return DecoderState(tuple(caches), tuple(summaries), 0)

    def step(self, y_t: Tensor, state: DecoderState) -> Tuple[Tensor, DecoderState]:
        """One token y_t [B, D] (embedded at position ``state.length``) -> (out_t [B, D], new state)."""
        caches = []
        for layer, cache, summary in zip(self.layers, state.self_attention, state.cross_attention):
            y_t, cache = layer.step(y_t, cache, summary)
            caches.append(cache)
        return self.norm(y_t), dataclasses.replace(state, self_attention=tuple(caches), length=state.length + 1)
