"""Transformer-XL relative attention (Dai et al., 2019, §3.3) with XLNet's relative segment
encoding (Yang et al., 2019, §2.5).

No position is added to the embeddings. The score of query i over key j is

    (q_i + u)·k_j  +  (q_i + v)·W_r R_{i−j}  +  (q_i + s)·e_{[seg_i ≠ seg_j]}

scaled by 1/√head_size: content, relative position (R: sinusoids of the distance i − j, over
the cached memory as well) and segment terms, with learned per-head biases u, v, s (XLNet's
r_w_bias, r_r_bias, r_s_bias) and two learned segment encodings e (same / different segment).
The position term is computed once for every distance the keys span and shifted into place
(`shifted_to_keys`), never as a (T × K × D) tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ferry.model.attention import KeyValue
from ferry.model.config import TransformerConfig


def relative_sinusoids(query_len: int, key_len: int, width: int, *, clamp: int = 0,
                       device: torch.device | None = None) -> torch.Tensor:
    """(key_len + query_len, width) encodings of the distances key_len, key_len − 1, …,
    −query_len + 1 (every query-minus-key distance of `query_len` queries after
    `key_len − query_len` memory positions, and one more): all sines, then all cosines, with
    wavelengths 2π·10000^(2i/width). `clamp` > 0 caps |distance| (XLNet's clamp_len)."""
    distances = torch.arange(key_len, -query_len, -1, device=device).float()  # (K+T,)
    if clamp > 0:
        distances = distances.clamp(-clamp, clamp)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, width, 2, device=device).float() / width)
    angles = distances[:, None] * inv_freq  # (K+T, width/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # (K+T, width)


def shifted_to_keys(scores: torch.Tensor, key_len: int) -> torch.Tensor:
    """(B, nh, T, K+T) scores of each query against every encoded distance (column p is
    distance K − p) → (B, nh, T, K): query i against key j, i.e. distance (K − T + i) − j,
    column T − i + j. Reshapes only (Transformer-XL's shift): drop the first row of the
    (K+T, T) view, and row i of the result starts T − i columns in."""
    B, nh, T, L = scores.shape
    shifted = scores.reshape(B, nh, L, T)[:, :, 1:]  # (B, nh, L−1, T)
    return shifted.reshape(B, nh, T, L - 1)[..., :key_len]  # (B, nh, T, K)


@dataclass
class RelativeFrame:
    """What every layer of a relative-attention stack shares in one forward pass.

    Args:
        positions: (K+T, D) distance encodings (`relative_sinusoids`), after dropout.
        segments_differ: (B, 1, T, K) 1.0 where query and key lie in different segments, or None
            (no segment ids: no segment term).
        content_bias: (B, 1, T, K) additive mask of the content stream.
        query_bias: (B, 1, T, K) additive mask of the query stream (permutation LM), or None.
    """

    positions: torch.Tensor
    segments_differ: torch.Tensor | None
    content_bias: torch.Tensor
    query_bias: torch.Tensor | None = None


class RelativeAttention(nn.Module):
    """Multi-head attention with relative positions and segments (see the module docstring).

    Projections have no biases (as in Transformer-XL and XLNet); forward hooks see the
    probabilities through `probabilities`, as in `MultiHeadAttention` (`ferry.model.probes`).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        inner = self.num_heads * self.head_dim
        self.q_proj = nn.Linear(config.d_model, inner, bias=False)
        self.k_proj = nn.Linear(config.d_model, inner, bias=False)
        self.v_proj = nn.Linear(config.d_model, inner, bias=False)
        self.out_proj = nn.Linear(inner, config.d_model, bias=False)
        self.position_proj = nn.Linear(config.d_model, inner, bias=False)  # W_r
        self.content_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))  # u
        self.position_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))  # v
        self.segment_bias = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))  # s
        # e: the encodings of "same segment" (row 0) and "different segment" (row 1)
        self.segment_embed = nn.Parameter(torch.zeros(2, self.num_heads, self.head_dim))
        for parameter in (self.content_bias, self.position_bias, self.segment_bias,
                          self.segment_embed):
            nn.init.normal_(parameter, std=0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.probabilities = nn.Identity()  # always formed here (no SDPA path)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def key_value(self, keys: torch.Tensor) -> KeyValue:
        """(B, K, D) memory + current states → per-head keys and values, (B, nh, K, hs) each."""
        return self._heads(self.k_proj(keys)), self._heads(self.v_proj(keys))

    def forward(self, x: torch.Tensor, key_value: KeyValue, frame: RelativeFrame,
                bias: torch.Tensor) -> torch.Tensor:
        """Attend from (B, T, D) `x` (the content or the query stream) over `key_value`
        (`key_value(keys)`, K positions) with the additive mask `bias` (B, 1, T, K)
        → (B, T, D)."""
        k, v = key_value  # (B, nh, K, hs)
        K = k.shape[2]
        q = self._heads(self.q_proj(x))  # (B, nh, T, hs)
        content = torch.matmul(q + self.content_bias[:, None], k.transpose(-2, -1))  # (B,nh,T,K)
        r = self.position_proj(frame.positions)  # (K+T, nh·hs)
        r = r.view(-1, self.num_heads, self.head_dim).transpose(0, 1)  # (nh, K+T, hs)
        position = shifted_to_keys(
            torch.matmul(q + self.position_bias[:, None], r.transpose(-2, -1)), K)  # (B,nh,T,K)
        scores = content + position
        if frame.segments_differ is not None:
            # each query against both segment encodings, then picked by same/different
            segment = torch.matmul(q + self.segment_bias[:, None],
                                   self.segment_embed.permute(1, 2, 0))  # (B, nh, T, 2)
            same, different = segment[..., :1], segment[..., 1:]  # (B, nh, T, 1) each
            scores = scores + same + frame.segments_differ * (different - same)
        probabilities = self.probabilities(torch.softmax(scores * self.scale + bias, dim=-1))
        y = torch.matmul(self.dropout(probabilities), v)  # (B, nh, T, hs)
        B, _, T, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)
