"""Token embeddings × sqrt(d_model) plus positional encodings (Vaswani et al. §3.4, §3.5)."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_table(max_positions: int, d_model: int) -> torch.Tensor:
    """(max_positions, d_model): PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(…)."""
    position = torch.arange(max_positions, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )  # (D/2,)
    table = torch.zeros(max_positions, d_model)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return table


class Embedding(nn.Module):
    """Token embedding × sqrt(d_model) + position encoding (+ segment embedding), then dropout.

    The token matrix is shared by encoder, decoder and (when tied) the output projection.
    Segment embeddings (BERT's token types: sentence A = 0, B = 1) start at zero, so adding them
    to a pretrained model changes nothing until fine-tuning moves them.
    """

    def __init__(
        self, *, vocab_size: int, d_model: int, max_positions: int, positional: str,
        dropout: float, type_vocab_size: int = 0,
    ) -> None:
        super().__init__()
        self.scale = math.sqrt(d_model)
        self.tokens = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.tokens.weight, std=d_model**-0.5)
        if positional == "learned":
            self.learned_positions = nn.Embedding(max_positions, d_model)
            nn.init.normal_(self.learned_positions.weight, std=0.02)
        else:
            self.learned_positions = None
            # Not persistent: recomputed from the config, so checkpoints hold only weights.
            self.register_buffer(
                "sinusoids", sinusoidal_table(max_positions, d_model), persistent=False
            )
        self.segments = nn.Embedding(type_vocab_size, d_model) if type_vocab_size else None
        if self.segments is not None:
            nn.init.zeros_(self.segments.weight)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: torch.Tensor, start: int | torch.Tensor = 0,
                token_type_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids whose first position is `start` — or whose positions are given per row,
        (B, T), as for left-padded prompts — (and their (B, T) segment ids) → (B, T, D)."""
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device) + start  # (T,)
        if self.learned_positions is not None:
            pos = self.learned_positions(positions)  # (T, D) or (B, T, D)
        else:
            pos = self.sinusoids[positions]  # (T, D) or (B, T, D)
        x = self.tokens(input_ids) * self.scale + pos  # (B, T, D)
        if self.segments is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.segments(token_type_ids)
        return self.dropout(x)
