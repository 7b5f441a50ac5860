"""The language-model head: final states → vocabulary logits.

The projection is the token embedding matrix (tied, the paper) or a matrix of its own, optionally
preceded by a dense + activation + LayerNorm transform (the MLM heads of BERT and RoBERTa) and
followed by a bias (BERT's MLM decoder bias, BART's `final_logits_bias`); T5 v1.0 scales the
states by 1/√d_model before its tied projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ferry.errors import FerryError
from ferry.model.config import TransformerConfig
from ferry.model.feed_forward import ACTIVATION_FUNCTIONS


class LanguageModelHead(nn.Module):
    """(B, T, D) final states → (B, T, V) logits; `tokens` is the shared embedding matrix."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        d_model, vocab = config.d_model, config.vocab_size
        transform = config.lm_head_transform == "dense_norm"
        # the transform maps to the embedding width: d_model, or ALBERT's narrower E
        width = config.embedding_width if transform else d_model
        self.dense = nn.Linear(d_model, width) if transform else None  # ALBERT: D → E
        self.activation = ACTIVATION_FUNCTIONS[config.activation]
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps) if transform else None
        self.projection = (None if config.tie_embeddings
                           else nn.Linear(width, vocab, bias=False))
        self.bias = nn.Parameter(torch.zeros(vocab)) if config.lm_head_bias else None
        self.scale = d_model**-0.5 if config.lm_head_scale == "inverse_sqrt_d_model" else 1.0

    def forward(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            h = self.norm(self.activation(self.dense(h)))  # (B, T, D), or (B, T, E): ALBERT
        if self.scale != 1.0:
            h = h * self.scale
        weight = tokens if self.projection is None else self.projection.weight  # (V, D|E)
        if weight.shape[-1] != h.shape[-1]:
            raise FerryError(f"the vocabulary projection is {weight.shape[-1]} wide but the "
                             f"states are {h.shape[-1]}: tied embeddings narrower than d_model "
                             "(embedding_size) need lm_head_transform: dense_norm")
        return F.linear(h, weight, self.bias)  # (B, T, V)

