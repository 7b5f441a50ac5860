"""Encoder and decoder layers (Vaswani et al. §3.1): sublayers wrapped in residual + LayerNorm."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ferry.model.attention import KeyValue, MultiHeadAttention
from ferry.model.config import TransformerConfig
from ferry.model.feed_forward import FeedForward


class Residual(nn.Module):
    """A sublayer's residual connection with its LayerNorm, post-norm (paper) or pre-norm.

    post: x = LayerNorm(x + Dropout(sublayer(x)))
    pre:  x = x + Dropout(sublayer(LayerNorm(x)))
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]):
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


def _attention(config: TransformerConfig) -> MultiHeadAttention:
    return MultiHeadAttention(
        d_model=config.d_model, num_heads=config.num_heads, dropout=config.dropout
    )


def _feed_forward(config: TransformerConfig) -> FeedForward:
    return FeedForward(
        d_model=config.d_model, d_ff=config.d_ff, activation=config.activation,
        dropout=config.dropout,
    )


class EncoderLayer(nn.Module):
    """Self-attention over the whole source, then the FFN."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = _attention(config)
        self.attn_residual = Residual(config)
        self.ffn = _feed_forward(config)
        self.ffn_residual = Residual(config)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(B, S, D) with a (B, 1, 1|S, S) bias → (B, S, D)."""
        x = self.attn_residual(x, lambda h: self.self_attn(h, bias=bias)[0])
        return self.ffn_residual(x, self.ffn)


class DecoderLayer(nn.Module):
    """Masked self-attention (with KV cache), encoder-decoder attention (if any), then the FFN."""

    def __init__(self, config: TransformerConfig, *, cross_attention: bool) -> None:
        super().__init__()
        self.self_attn = _attention(config)
        self.self_residual = Residual(config)
        self.cross_attn = _attention(config) if cross_attention else None
        self.cross_residual = Residual(config) if cross_attention else None
        self.ffn = _feed_forward(config)
        self.ffn_residual = Residual(config)

    def forward(
        self,
        x: torch.Tensor,
        *,
        self_bias: torch.Tensor | None,
        past: KeyValue | None,
        cross_key_value: KeyValue | None,
        cross_bias: torch.Tensor | None,
    ) -> tuple[torch.Tensor, KeyValue]:
        """(B, T, D) → (B, T, D) and this layer's updated self-attention cache (B, nh, P+T, hs)."""
        present: list[KeyValue] = []

        def self_attention(h: torch.Tensor) -> torch.Tensor:
            out, kv = self.self_attn(h, past=past, bias=self_bias)
            present.append(kv)
            return out

        x = self.self_residual(x, self_attention)
        if self.cross_attn is not None:
            x = self.cross_residual(
                x, lambda h: self.cross_attn(h, key_value=cross_key_value, bias=cross_bias)[0]
            )
        return self.ffn_residual(x, self.ffn), present[0]
