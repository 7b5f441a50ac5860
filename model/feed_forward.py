"""Position-wise feed-forward network (Vaswani et al. §3.3): Linear → activation → Linear, or
its gated variants (GLU, Shazeer 2020: SwiGLU, GeGLU)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ferry.model.config import TransformerConfig

# The named FFN non-linearities of `TransformerConfig.activation`.
ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,  # the paper
    "gelu": F.gelu,  # exact (erf) GELU: BERT, RoBERTa, BART, mBART
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # GPT-2's "gelu_new", T5 v1.1's GeGLU
    "silu": F.silu,  # Marian's "swish", Llama's SwiGLU
}


class FeedForward(nn.Module):
    """FFN(x) = act(x W1 + b1) W2 + b2, applied to every position alike; gated
    (`feed_forward="gated"`): FFN(x) = (act(x Wg) ⊙ x W1) W2.

    Built from the config's `d_model`, `d_ff` (inner width), `activation` (a name of
    `ACTIVATION_FUNCTIONS`), `feed_forward`, `ffn_bias` and `dropout` (on the inner activations,
    training only).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        bias = config.ffn_bias
        self.gate = (nn.Linear(config.d_model, config.d_ff, bias=bias)
                     if config.feed_forward == "gated" else None)
        self.up = nn.Linear(config.d_model, config.d_ff, bias=bias)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=bias)
        self.activation = ACTIVATION_FUNCTIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) → (B, T, D)."""
        if self.gate is None:
            inner = self.activation(self.up(x))  # (B, T, d_ff)
        else:
            inner = self.activation(self.gate(x)) * self.up(x)  # (B, T, d_ff)
        return self.down(self.dropout(inner))
