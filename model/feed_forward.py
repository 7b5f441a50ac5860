"""Position-wise feed-forward network (Vaswani et al. §3.3): Linear → activation → Linear."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# The named FFN non-linearities of `TransformerConfig.activation`.
ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,  # the paper
    "gelu": F.gelu,  # exact (erf) GELU: BERT, RoBERTa, BART, mBART
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # GPT-2's "gelu_new"
    "silu": F.silu,  # Marian's "swish"
}


class FeedForward(nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2, applied to every position alike.

    Args:
        d_model: model width.
        d_ff: inner width (2048 for Transformer base).
        activation: a name of `ACTIVATION_FUNCTIONS`.
        dropout: dropout on the inner activations, training only.
    """

    def __init__(self, *, d_model: int, d_ff: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.activation = ACTIVATION_FUNCTIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) → (B, T, D)."""
        return self.down(self.dropout(self.activation(self.up(x))))
