"""Task heads on the final hidden states of an encoder-only or decoder-only model.

- sequence classification: one vector per sequence → `num_labels` logits. Encoders pool the first
  position (or, `pooled_position: last`, the last real token: XLNet) through dense + tanh (BERT's
  pooler); decoder-only models read the last real token, the only position that has seen the
  whole input.
- token classification: `num_labels` logits per position (sequence labelling, BIO tags).
- question answering: a start and an end logit per position (an extractive span).
"""

from __future__ import annotations

import torch
from torch import nn

from ferry.model.config import TransformerConfig


class SequenceClassificationHead(nn.Module):
    """(B, S, D) states + (B, S) mask → (B, num_labels) logits."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        decoder_only = config.architecture == "decoder-only"
        position = config.pooled_position
        self.last_token = position == "last" or (position == "auto" and decoder_only)
        self.pooler = None if decoder_only else nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels, bias=config.head_bias)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.last_token:
            # the last real token under left or right padding: the positions before the
            # running count of real tokens reaches the row's total
            seen = attention_mask.cumsum(dim=1)  # (B, S)
            last = (seen < seen[:, -1:]).sum(dim=1)  # (B,)
            pooled = states[torch.arange(states.shape[0], device=states.device), last]  # (B, D)
        else:
            pooled = states[:, 0]  # (B, D)
        if self.pooler is not None:
            pooled = torch.tanh(self.pooler(pooled))
        return self.classifier(self.dropout(pooled))  # (B, L)


class TokenClassificationHead(nn.Module):
    """(B, S, D) states → (B, S, num_labels) logits."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.d_model, config.num_labels, bias=config.head_bias)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(states))


class QuestionAnsweringHead(nn.Module):
    """(B, S, D) states → (B, S, 2): start and end logits of the answer span."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.span = nn.Linear(config.d_model, 2, bias=config.head_bias)

    def forward(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.span(states)


HEADS: dict[str, type[nn.Module]] = {
    "sequence_classification": SequenceClassificationHead,
    "token_classification": TokenClassificationHead,
    "question_answering": QuestionAnsweringHead,
}


def make_head(config: TransformerConfig) -> nn.Module | None:
    """The task head a config asks for, or None (`task_head: none`)."""
    return HEADS[config.task_head](config) if config.task_head != "none" else None
