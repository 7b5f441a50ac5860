"""Rotary position embeddings (RoFormer, Su et al., 2021), as Llama, Mistral and Qwen use them.

Each head's queries and keys are rotated in the planes (i, i + hs/2) by angle position · θᵢ,
θᵢ = rope_theta^(-2i/hs), so q·k depends on the positions only through their difference. The
angles are computed from the position tensor inside the graph (one multiply), so left-padded rows
and cached steps rotate by their own positions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ferry.model.config import TransformerConfig


class Rotation(NamedTuple):
    """The rotation of one call's positions: what the written-out attention multiplies by, and
    what ONNX Runtime's rotary kernels take instead (position ids and per-position tables)."""

    cos: torch.Tensor  # (B|1, 1, T, hs)
    sin: torch.Tensor  # (B|1, 1, T, hs)
    positions: torch.Tensor  # (B|1, T) int64
    inverse_frequencies: torch.Tensor  # (hs/2,) θᵢ

    def tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of every position < `length`, (length, hs/2) each: the caches
        `com.microsoft.GroupQueryAttention` looks the position ids up in."""
        angles = torch.arange(length, dtype=torch.float32)[:, None] * self.inverse_frequencies
        return angles.cos(), angles.sin()  # (length, hs/2) each


def inverse_frequencies(config: TransformerConfig) -> torch.Tensor:
    """(hs/2,) fp32 θᵢ = rope_theta^(-2i/hs), with the config's `rope_scaling` applied."""
    dim = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    factor = config.rope_scaling_factor
    if config.rope_scaling == "linear":  # positions ÷ factor, folded into the frequencies
        return inv_freq / factor
    if config.rope_scaling == "llama3":  # Llama 3.1: long wavelengths scaled, short kept,
        context = config.rope_original_max_positions  # the band between interpolated
        low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
        smooth = (context / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        between = (wavelength >= context / high) & (wavelength <= context / low)
        return torch.where(between, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Positions → the (cos, sin) a stack's attention layers rotate queries and keys by."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        # Not persistent: recomputed from the config, so checkpoints hold only weights.
        self.register_buffer("inv_freq", inverse_frequencies(config), persistent=False)

    def forward(self, positions: torch.Tensor) -> Rotation:
        """(T,) or (B, T) positions → their `Rotation` (cos, sin, each (B|1, 1, T, hs))."""
        positions = positions if positions.dim() == 2 else positions[None]  # (B|1, T)
        angles = positions[..., None].to(torch.float32) * self.inv_freq  # (B|1, T, hs/2)
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # (B|1, 1, T, hs)
        return Rotation(angles.cos(), angles.sin(), positions, self.inv_freq)


def rotate(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Rotate (B, nh, T, hs) queries or keys by their positions' angles."""
    cos, sin = rotation.cos, rotation.sin
    first, second = x.chunk(2, dim=-1)  # (B, nh, T, hs/2) each
    return x * cos.to(x.dtype) + torch.cat([-second, first], dim=-1) * sin.to(x.dtype)
