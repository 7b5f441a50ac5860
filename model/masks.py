"""Attention masks as additive biases.

Masks are combined as booleans first and turned into a bias once, using the dtype's lowest finite
value rather than -inf: a fully masked row (an all-padding sequence) then softmaxes to a uniform
row instead of NaN, in torch, ONNX Runtime and TensorRT alike.
"""

from __future__ import annotations

import torch


def padding_allowed(mask: torch.Tensor) -> torch.Tensor:
    """(B, S) 1/0 key mask → (B, 1, 1, S) boolean: which keys every query may attend to."""
    return (mask != 0)[:, None, None, :]


def causal_allowed(query_len: int, key_len: int, device: torch.device,
                   start: torch.Tensor | None = None) -> torch.Tensor:
    """(1, 1, Tq, Tk) boolean: query i sees keys ≤ its position, which is `start` + i (a static
    cache's write position), by default the last `query_len` of the `key_len` positions."""
    past_len = key_len - query_len if start is None else start
    query_pos = torch.arange(query_len, device=device)[:, None] + past_len  # (Tq, 1)
    key_pos = torch.arange(key_len, device=device)[None, :]  # (1, Tk)
    return (key_pos <= query_pos)[None, None]


def to_bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean mask → additive bias: 0 where allowed, the dtype's lowest finite value elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    lowest = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, lowest)
