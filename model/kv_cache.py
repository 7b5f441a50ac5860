"""A static KV cache: preallocated per-layer buffers written in place at a position tensor.

The default cache (`past` as plain (B, nh, P, hs) tensors) grows by concatenation, so every step
copies it and every step has new shapes. With `StaticKeyValue` the buffers keep one shape
(B, nh, capacity, hs) across steps, the new keys/values are written at `position` (a device
tensor, not a Python int), and attention runs over the whole buffer with the unwritten tail
masked: every decode step is then the same computation on the same shapes, which is what CUDA
graphs (`torch.compile(mode="reduce-overhead")`) need to replay it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StaticKeyValue:
    """One layer's self-attention cache buffers, zero beyond what has been written (masked
    positions still meet the values matmul, and 0 · garbage must not be NaN).

    keys, values: (B, nh, capacity, hs); position: (1,) int64, where the next token goes.
    """

    keys: torch.Tensor
    values: torch.Tensor
    position: torch.Tensor

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, nh, T, hs) new keys/values at position … position+T-1, in place; returns
        the whole buffers to attend over."""
        slots = self.position + torch.arange(k.shape[2], device=k.device)  # (T,)
        self.keys.index_copy_(2, slots, k)
        self.values.index_copy_(2, slots, v)
        return self.keys, self.values  # (B, nh, capacity, hs) each

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

