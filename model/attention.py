"""Multi-head scaled dot-product attention with an explicit KV cache.

The cache is passed in and returned, never hidden in module state: export turns it into graph
inputs/outputs (`past_*` → `present_*`), and the runtime owns it between steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ferry.model import fused_attention  # noqa: F401  (registers the ferry:: operators)
from ferry.model.kv_cache import StaticKeyValue

KeyValue = tuple[torch.Tensor, torch.Tensor]  # (B, nh, T, hs) each


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. §3.2.2) over `F.scaled_dot_product_attention`.

    Args:
        d_model: model width.
        num_heads: number of heads; `d_model // num_heads` is the head size.
        dropout: attention-probability dropout, applied in training only.

    `export_fused` (off unless `ferry.model.fused_attention.fused_attention_export` turns it on
    for an export) makes an exporting layer one fused attention operator.
    """

    def __init__(self, *, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.export_fused = False
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def key_value(self, x: torch.Tensor) -> KeyValue:
        """Project (B, T, D) states into per-head keys and values, each (B, nh, T, hs)."""
        return self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_value: KeyValue | None = None,
        past: KeyValue | StaticKeyValue | None = None,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        """Attend from `x` (B, T, D).

        Self-attention: leave `key_value` unset; keys/values come from `x`, appended to `past`
        (or written into a `StaticKeyValue`'s buffers, which are then attended over whole).
        Cross-attention: pass the memory's precomputed `key_value` (computed once per request).

        Args:
            bias: additive mask broadcastable to (B, nh, T, S), see `ferry.model.masks`.

        Returns:
            (B, T, D) output and the keys/values attended over, (B, nh, S, hs) each: for
            self-attention that is the updated cache.
        """
        B, T, D = x.shape
        if self.export_fused and torch.compiler.is_exporting() and bias is not None:
            return self._fused(x, key_value=key_value, past=past, bias=bias)
        q = self._split_heads(self.q_proj(x))  # (B, nh, T, hs)
        if key_value is None:
            k, v = self.key_value(x)  # (B, nh, T, hs)
            if isinstance(past, StaticKeyValue):
                k, v = past.write(k, v)  # (B, nh, capacity, hs), written in place
            elif past is not None:
                k = torch.cat([past[0], k], dim=2)  # (B, nh, P+T, hs)
                v = torch.cat([past[1], v], dim=2)
        else:
            k, v = key_value  # (B, nh, S, hs)
        if torch.compiler.is_exporting():
            y = exported_attention(q, k, v, bias)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out_proj(y), (k, v)

    def _fused(self, x: torch.Tensor, *, key_value: KeyValue | None,
               past: KeyValue | StaticKeyValue | None, bias: torch.Tensor
               ) -> tuple[torch.Tensor, KeyValue]:
        """`forward` as one fused attention operator (see `ferry.model.fused_attention`)."""
        bias = bias.expand(-1, -1, x.shape[1], -1)  # (B|1, 1, T, S): the kernel wants T rows
        if isinstance(past, StaticKeyValue):  # the cache is written in place by the kernel
            y, k, v = torch.ops.ferry.cached_self_attention(
                self.q_proj(x), self.k_proj(x), self.v_proj(x), past.keys, past.values,
                past.position, self.num_heads)  # (B, T, D), (B, nh, capacity, hs) × 2
        elif key_value is None:
            past_key, past_value = past if past is not None else (None, None)
            y, k, v = torch.ops.ferry.self_attention(
                self.q_proj(x), self.k_proj(x), self.v_proj(x), past_key, past_value, bias,
                self.num_heads)  # (B, T, D), (B, nh, P+T, hs) × 2
        else:
            k, v = key_value
            y = torch.ops.ferry.cross_attention(self.q_proj(x), k, v, bias, self.num_heads)
        return self.out_proj(y), (k, v)


def exported_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q·kᵀ/√hs + bias)·v written out, the form export gives the ONNX graphs.

    The same function as `F.scaled_dot_product_attention` (export validates the graphs against
    the SDPA reference within 1e-4), but shaped for inference engines: the key transpose feeds
    the matmul directly, so ONNX Runtime folds it into the matmul (FusedMatMul) instead of
    transposing the whole KV cache at every step, as SDPA's decomposition (which scales q and k
    separately) makes it do.
    """
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-2, -1))  # (B, nh, T, S)
    if bias is not None:
        scores = scores + bias
    return torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, nh, T, hs)
