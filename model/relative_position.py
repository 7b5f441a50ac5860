"""T5's relative position bias (Raffel et al., 2020, §2.1; Shaw et al., 2018).

No position is added to the embeddings; instead every attention score gets a learned per-head
bias for the distance key − query, bucketed: exact for short distances, logarithmic up to
`relative_attention_max_distance`, one bucket beyond. The encoder's buckets tell left from right;
the decoder's (causal) only count backwards. One table per stack, shared by all its layers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ferry.model.config import TransformerConfig


def relative_buckets(distance: torch.Tensor, *, bidirectional: bool, num_buckets: int,
                     max_distance: int) -> torch.Tensor:
    """int64 key − query distances → bucket ids in [0, num_buckets), T5's bucketing."""
    buckets = torch.zeros_like(distance)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (distance > 0).to(distance.dtype) * num_buckets
        distance = distance.abs()
    else:
        distance = -distance.clamp(max=0)  # keys ahead of the query count as distance 0
    exact = num_buckets // 2
    # (clamped below at `exact` so the log never sees 0; such distances take the exact branch)
    logarithmic = exact + (
        torch.log(distance.clamp(min=exact).to(torch.float32) / exact)
        / math.log(max_distance / exact) * (num_buckets - exact)
    ).to(distance.dtype)
    logarithmic = logarithmic.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, logarithmic)


class RelativePositionBias(nn.Module):
    """A stack's bucketed relative position bias: (query, key) positions → (1, nh, Tq, Tk).

    Args:
        bidirectional: True for an encoder, False for a (causal) decoder.
    """

    def __init__(self, config: TransformerConfig, *, bidirectional: bool) -> None:
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.table = nn.Embedding(self.num_buckets, config.num_heads)

    def forward(self, query_positions: torch.Tensor, key_length: int | torch.Tensor
                ) -> torch.Tensor:
        """(Tq,) int64 query positions, keys at 0 … key_length-1 → (1, nh, Tq, Tk) bias."""
        keys = torch.arange(key_length, device=query_positions.device)  # (Tk,)
        distance = keys[None, :] - query_positions[:, None]  # (Tq, Tk)
        buckets = relative_buckets(distance, bidirectional=self.bidirectional,
                                   num_buckets=self.num_buckets, max_distance=self.max_distance)
        return self.table(buckets).permute(2, 0, 1)[None]  # (1, nh, Tq, Tk)
