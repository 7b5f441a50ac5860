"""Encoder and decoder layers (Vaswani et al. §3.1): sublayers wrapped in residual + LayerNorm."""

from __future__ import annotations

import torch
from torch import nn

from ferry.model.attention import KeyValue, MultiHeadAttention
from ferry.model.config import TransformerConfig
from ferry.model.feed_forward import FeedForward
from ferry.model.norms import make_norm
from ferry.model.rotary import Rotation


class Residual(nn.Module):
    """A sublayer's residual connection with its norm (`config.norm`), post-norm (paper) or
    pre-norm.

    post: x = LayerNorm(x + Dropout(sublayer(x)))
    pre:  x = x + Dropout(sublayer(LayerNorm(x)))

    Used as `out = sublayer(res.sublayer_input(x)); x = res(x, out)`: the call returns the
    residual stream after the sublayer, which `ferry.model.probes` records.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.pre_norm = config.norm_placement == "pre"
        self.norm = make_norm(config)
        self.dropout = nn.Dropout(config.dropout)

    def sublayer_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.pre_norm else x

    def forward(self, x: torch.Tensor, sublayer_output: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(sublayer_output)
        return x if self.pre_norm else self.norm(x)


class EncoderLayer(nn.Module):
    """Self-attention over the whole source, then the FFN."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config)
        self.attn_residual = Residual(config)
        self.ffn = FeedForward(config)
        self.ffn_residual = Residual(config)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, rotation: Rotation | None = None
                ) -> torch.Tensor:
        """(B, S, D) with a (B, 1|nh, 1|S, S) bias (and rotary angles) → (B, S, D)."""
        attended, _ = self.self_attn(self.attn_residual.sublayer_input(x), bias=bias,
                                     rotation=rotation)
        x = self.attn_residual(x, attended)
        return self.ffn_residual(x, self.ffn(self.ffn_residual.sublayer_input(x)))


class DecoderLayer(nn.Module):
    """Masked self-attention (with KV cache), encoder-decoder attention (if any), then the FFN."""

    def __init__(self, config: TransformerConfig, *, cross_attention: bool) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(config, causal=True)
        self.self_residual = Residual(config)
        self.cross_attn = MultiHeadAttention(config) if cross_attention else None
        self.cross_residual = Residual(config) if cross_attention else None
        self.ffn = FeedForward(config)
        self.ffn_residual = Residual(config)

    def forward(
        self,
        x: torch.Tensor,
        *,
        self_bias: torch.Tensor | None,
        past: KeyValue | None,
        cross_key_value: KeyValue | None,
        cross_bias: torch.Tensor | None,
        rotation: Rotation | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        """(B, T, D) → (B, T, D) and this layer's updated self-attention cache (B, nkv, P+T, hs)."""
        attended, present = self.self_attn(
            self.self_residual.sublayer_input(x), past=past, bias=self_bias, rotation=rotation
        )
        x = self.self_residual(x, attended)
        if self.cross_attn is not None:
            attended, _ = self.cross_attn(
                self.cross_residual.sublayer_input(x), key_value=cross_key_value, bias=cross_bias
            )
            x = self.cross_residual(x, attended)
        return self.ffn_residual(x, self.ffn(self.ffn_residual.sublayer_input(x))), present


def applied_layers(layers: nn.ModuleList, depth: int) -> list[nn.Module]:
    """The `depth` layers a stack applies, in order: its own, or under cross-layer sharing
    (`config.layer_groups`) layer i the weights of set ⌊i · sets / depth⌋ (ALBERT)."""
    return [layers[i * len(layers) // depth] for i in range(depth)]
