"""Input embeddings (Vaswani et al. §3.4, §3.5, and the variants of later families).

- `TokenEmbedding`: the token matrix (× √d_model in the paper) plus segment embeddings, shared by
  encoder, decoder and (when tied) the output projection.
- `StackEmbedding`: what each stack adds to the token embeddings: its position encoding (a
  sinusoid table, or a learned table of its own; none for rotary and relative positions, which
  act inside attention), an optional LayerNorm, dropout, and (ALBERT's factorised embeddings,
  narrower than d_model) the projection to d_model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ferry.model.config import TransformerConfig


def sinusoidal_table(max_positions: int, d_model: int, *, layout: str = "interleaved"
                     ) -> torch.Tensor:
    """(max_positions, d_model): PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(…).

    `layout="concat"` puts the same sines in the first half and the cosines in the second
    (fairseq, Marian).
    """
    position = torch.arange(max_positions, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )  # (D/2,)
    angles = position * inv_freq  # (P, ceil(D/2))
    table = torch.zeros(max_positions, d_model)
    if layout == "concat":
        half = (d_model + 1) // 2  # sines fill the first ceil(D/2) columns
        table[:, :half] = torch.sin(angles)
        table[:, half:] = torch.cos(angles[:, : d_model // 2])
    else:
        table[:, 0::2] = torch.sin(angles)
        table[:, 1::2] = torch.cos(angles[:, : d_model // 2])
    return table


class TokenEmbedding(nn.Module):
    """Token embedding (× √d_model unless `embedding_scale` is "none") + segment embedding.

    The token matrix is shared by encoder, decoder and (when tied) the output projection.
    Segment embeddings (BERT's token types: sentence A = 0, B = 1) start at zero, so adding them
    to a pretrained model changes nothing until fine-tuning moves them.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        width = config.embedding_width  # d_model, or ALBERT's narrower embedding_size
        self.scale = (math.sqrt(config.d_model) if config.embedding_scale == "sqrt_d_model"
                      else 1.0)
        self.tokens = nn.Embedding(config.vocab_size, width)
        nn.init.normal_(self.tokens.weight, std=width**-0.5)
        self.segments = (nn.Embedding(config.type_vocab_size, width)
                         if config.type_vocab_size else None)
        if self.segments is not None:
            nn.init.zeros_(self.segments.weight)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None
                ) -> torch.Tensor:
        """(B, T) ids (and their (B, T) segment ids) → (B, T, E) (E = d_model unless
        factorised)."""
        x = self.tokens(input_ids) * self.scale  # (B, T, E)
        if self.segments is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.segments(token_type_ids)
        return x


class StackEmbedding(nn.Module):
    """A stack's input: token embeddings + its position encoding, then (optionally) LayerNorm,
    then dropout. Encoder and decoder each have one (BART and mBART train a position table and
    an embedding norm per stack)."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.offset = config.position_offset
        rows = config.max_positions + config.position_offset
        width = config.embedding_width
        # rotary / relative positions act inside attention (`ferry.model.transformer.
        # StackPositions`): nothing is added here
        self.learned_positions = None
        self.register_buffer("sinusoids", None, persistent=False)
        if config.positional == "learned":
            self.learned_positions = nn.Embedding(rows, width)
            nn.init.normal_(self.learned_positions.weight, std=0.02)
        elif config.positional.startswith("sinusoidal"):
            layout = "concat" if config.positional == "sinusoidal_concat" else "interleaved"
            # Not persistent: recomputed from the config, so checkpoints hold only weights.
            self.register_buffer("sinusoids", sinusoidal_table(rows, width, layout=layout),
                                 persistent=False)
        self.norm = (nn.LayerNorm(width, eps=config.layer_norm_eps)
                     if config.embedding_norm == "layernorm" else nn.Identity())
        self.dropout = nn.Dropout(config.dropout)
        # factorised embeddings (ALBERT's embedding_hidden_mapping_in): E → d_model, whenever
        # embedding_size is set (an ALBERT checkpoint has it even where E = d_model)
        self.project = nn.Linear(width, config.d_model) if config.embedding_size else None

    def position_encoding(self, positions: torch.Tensor) -> torch.Tensor | None:
        """(T,) or (B, T) positions (0 = the first token) → (T, D) or (B, T, D); None when
        positions act inside attention instead."""
        rows = positions + self.offset
        if self.learned_positions is not None:
            return self.learned_positions(rows)
        return self.sinusoids[rows] if self.sinusoids is not None else None

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, T, E) token embeddings at (T,) or (B, T) positions → (B, T, D) stack input."""
        encoding = self.position_encoding(positions)
        x = self.dropout(self.norm(tokens if encoding is None else tokens + encoding))  # (B,T,E)
        return self.project(x) if self.project is not None else x  # (B, T, D)
