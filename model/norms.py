"""Normalisation layers: the one place a config's `norm` choice becomes a module.

- LayerNorm (Ba et al., 2016): centred and scaled per position, with a gain and a bias.
- RMSNorm (Zhang & Sennrich, 2019): scaled by the root mean square only, a gain and no bias
  (T5's `T5LayerNorm`, Llama's `LlamaRMSNorm`, Mistral, Qwen).
"""

from __future__ import annotations

import torch
from torch import nn

from ferry.model.config import TransformerConfig


class RMSNorm(nn.Module):
    """y = x / √(mean(x²) + eps) · weight, computed in fp32 whatever the input dtype (as T5 and
    Llama do), over the last dimension."""

    def __init__(self, size: int, *, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(…, size) → (…, size)."""
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_norm(config: TransformerConfig, size: int | None = None) -> nn.Module:
    """The config's norm over `size` features (default `d_model`), with its `layer_norm_eps`."""
    size = config.d_model if size is None else size
    if config.norm == "rmsnorm":
        return RMSNorm(size, eps=config.layer_norm_eps)
    return nn.LayerNorm(size, eps=config.layer_norm_eps)
