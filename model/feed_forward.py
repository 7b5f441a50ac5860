"""Position-wise feed-forward network (Vaswani et al. §3.3): Linear → activation → Linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2, applied to every position alike.

    Args:
        d_model: model width.
        d_ff: inner width (2048 for Transformer base).
        activation: "relu" or "gelu".
        dropout: dropout on the inner activations, training only.
    """

    def __init__(self, *, d_model: int, d_ff: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.activation = F.relu if activation == "relu" else F.gelu
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) → (B, T, D)."""
        return self.down(self.dropout(self.activation(self.up(x))))
