"""The XLNet encoder (Yang et al., 2019): relative attention, segment recurrence and two-stream
self-attention.

- Relative positions and segments act inside attention (`ferry.model.relative_attention`).
- Segment recurrence (Transformer-XL, Dai et al. 2019, §3.2): each layer also attends over a
  memory of the previous segment's layer inputs (`Memory`, at most `config.memory_length` states,
  no gradient through it), so a text longer than one segment is read segment by segment.
- Two streams (XLNet §2.3): for permutation language modelling, beside the content stream h
  (token i sees the tokens before it in the factorisation order, and itself) a query stream g
  starts from one learned vector and sees only the tokens before it: g_i knows its position but
  not its token, which it predicts. Both streams share every weight; the query stream is
  dropped at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ferry.model.config import TransformerConfig
from ferry.model.embedding import StackEmbedding
from ferry.model.feed_forward import FeedForward
from ferry.model.layers import Residual, applied_layers
from ferry.model.masks import padding_allowed, to_bias
from ferry.model.norms import make_norm
from ferry.model.relative_attention import RelativeAttention, RelativeFrame, relative_sinusoids


@dataclass
class Memory:
    """The cached layer inputs of earlier segments: `states` (layers, B, M, D) and their 1/0
    `mask` (B, M) (padding of earlier segments stays masked); M ≤ `config.memory_length`."""

    states: torch.Tensor
    mask: torch.Tensor


class EncoderPass(NamedTuple):
    """What `RecurrentEncoder.forward` returns: the content stream's (B, T, D) final states, the
    query stream's (B, T, D) (permutation LM; else None) and the next memory (None without
    `config.memory_length`)."""

    states: torch.Tensor
    queries: torch.Tensor | None
    memory: Memory | None


class RecurrentEncoderLayer(nn.Module):
    """Relative self-attention over memory + the segment, then the FFN, each with its residual;
    run on the content stream and (when given) on the query stream with the same weights."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.self_attn = RelativeAttention(config)
        self.attn_residual = Residual(config)
        self.ffn = FeedForward(config)
        self.ffn_residual = Residual(config)

    def _stream(self, x: torch.Tensor, key_value, frame: RelativeFrame, bias: torch.Tensor
                ) -> torch.Tensor:
        attended = self.self_attn(self.attn_residual.sublayer_input(x), key_value, frame, bias)
        x = self.attn_residual(x, attended)
        return self.ffn_residual(x, self.ffn(self.ffn_residual.sublayer_input(x)))

    def forward(self, x: torch.Tensor, frame: RelativeFrame, memory: torch.Tensor | None = None,
                queries: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, T, D) content stream with (B, M, D) memory (and the (B, T, D) query stream)
        → the next layer's content (and query) stream."""
        keys = x if memory is None else torch.cat([memory, x], dim=1)  # (B, K, D)
        key_value = self.self_attn.key_value(self.attn_residual.sublayer_input(keys))
        content = self._stream(x, key_value, frame, frame.content_bias)
        if queries is None:
            return content, None
        return content, self._stream(queries, key_value, frame, frame.query_bias)


class RecurrentEncoder(nn.Module):
    """The XLNet encoder stack (see the module docstring); its layers may share weights
    (`config.layer_groups`) like `ferry.model.transformer.Encoder`'s."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = StackEmbedding(config)  # token dropout only: positions act in attention
        self.layers = nn.ModuleList(RecurrentEncoderLayer(config) for _ in range(
            config.layer_groups or config.num_encoder_layers))
        self.depth = config.num_encoder_layers
        self.final_norm = make_norm(config) if config.norm_placement == "pre" else nn.Identity()
        # the query stream's input at every predicted position (XLNet's mask_emb)
        self.query_embedding = nn.Parameter(torch.zeros(1, 1, config.d_model))
        nn.init.normal_(self.query_embedding, std=0.02)
        self.position_dropout = nn.Dropout(config.dropout)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor,
                segments: torch.Tensor | None = None, *, memory: Memory | None = None,
                order: torch.Tensor | None = None) -> EncoderPass:
        """Encode one segment.

        Args:
            tokens: (B, T, D) token embeddings.
            attention_mask: (B, T) 1/0 padding mask.
            segments: (B, T) segment ids (any integers: only equality counts), or None.
            memory: the earlier segments' `Memory`, or None.
            order: (B, T, T) bool, permutation LM: [b, i, j] when token j comes before token i
                in row b's factorisation order. Runs the query stream beside the content one.
        """
        B, T, _ = tokens.shape
        M = 0 if memory is None else memory.states.shape[2]
        x = self.embed(tokens, torch.arange(T, device=tokens.device))  # (B, T, D)
        key_mask = attention_mask if memory is None else torch.cat(
            [memory.mask.to(attention_mask.dtype), attention_mask], dim=1)  # (B, K)
        keys_allowed = padding_allowed(key_mask)  # (B, 1, 1, K)
        content_allowed = query_allowed = keys_allowed
        if order is not None:
            in_memory = torch.ones(B, T, M, dtype=torch.bool, device=order.device)
            before = torch.cat([in_memory, order], dim=2)[:, None]  # (B, 1, T, K)
            itself = torch.eye(T, dtype=torch.bool, device=order.device)
            itself = torch.cat([in_memory[:1], itself[None]], dim=2)[:, None]  # (1, 1, T, K)
            content_allowed = keys_allowed & (before | itself)
            query_allowed = keys_allowed & before
        segments_differ = None
        if segments is not None:
            key_segments = segments if memory is None else torch.cat(
                [torch.zeros(B, M, dtype=segments.dtype, device=segments.device), segments], 1)
            segments_differ = (segments[:, :, None] != key_segments[:, None, :])  # (B, T, K)
            segments_differ = segments_differ[:, None].to(tokens.dtype)  # (B, 1, T, K)
        frame = RelativeFrame(
            positions=self.position_dropout(relative_sinusoids(
                T, M + T, self.config.d_model, clamp=self.config.clamp_distance,
                device=tokens.device)).to(tokens.dtype),
            segments_differ=segments_differ,
            content_bias=to_bias(content_allowed, tokens.dtype),
            query_bias=to_bias(query_allowed, tokens.dtype) if order is not None else None)
        queries = None if order is None else self.embed.dropout(
            self.query_embedding.expand(B, T, -1))  # (B, T, D)
        kept = []
        for i, layer in enumerate(applied_layers(self.layers, self.depth)):
            if self.config.memory_length:
                kept.append(x if memory is None else torch.cat([memory.states[i], x], dim=1))
            x, queries = layer(x, frame, None if memory is None else memory.states[i], queries)
        next_memory = None
        if self.config.memory_length:  # the last memory_length states (HF's cache_mem)
            length = self.config.memory_length
            next_memory = Memory(torch.stack(kept)[:, :, -length:].detach(),
                                 key_mask[:, -length:])
        return EncoderPass(self.final_norm(x),
                           None if queries is None else self.final_norm(queries), next_memory)
