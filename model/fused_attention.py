"""Attention as opaque operators, for exporting graphs with fused attention kernels.

Inside `fused_attention_export(model)`, the model's exporting `MultiHeadAttention`s call
`ferry::self_attention` / `ferry::cross_attention` / `ferry::cached_self_attention` instead of
writing the attention out; `ferry.export.fused_graphs` translates each call into one ONNX
Runtime node: the first two into `com.microsoft.MultiHeadAttention` (head split, scaled scores,
mask, softmax, values, head merge and the KV-cache append in one kernel), except self-attention
with fewer key/value heads than query heads (a decoder's, causal), which becomes
`com.microsoft.GroupQueryAttention` with the mask as its attention bias; the third,
self-attention over a static cache, also `GroupQueryAttention`, which writes the new
keys/values into the cache buffer in place (its bias — causal, padding, relative position —
cut to the positions written so far). The portable graphs never use them. All three also
run eagerly, as the written-out attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ferry.model.kv_cache import StaticKeyValue


@contextlib.contextmanager
def fused_attention_export(model: torch.nn.Module) -> Iterator[None]:
    """Within this block, `model`'s attention layers export as the fused operators (each
    layer's `export_fused`); other models, and `model` outside the block, export the written-out
    attention."""
    from ferry.model.attention import MultiHeadAttention

    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    previous = [layer.export_fused for layer in layers]
    for layer in layers:
        layer.export_fused = True
    try:
        yield
    finally:
        for layer, value in zip(layers, previous):
            layer.export_fused = value


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    B, T, D = x.shape
    return x.view(B, T, num_heads, D // num_heads).transpose(1, 2)  # (B, nh, T, hs)


def _merged(y: torch.Tensor) -> torch.Tensor:
    B, nh, T, hs = y.shape
    return y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, D)


def _rotated(x: torch.Tensor, cos_cache: torch.Tensor | None, sin_cache: torch.Tensor | None,
             position_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, n, T, hs) heads rotated by the (B, T) positions' rows of the (length, hs/2) tables,
    as GroupQueryAttention's rotary option does; unrotated without tables."""
    if cos_cache is None or sin_cache is None or position_ids is None:
        return x
    cos = torch.cat([cos_cache[position_ids]] * 2, dim=-1)[:, None]  # (B, 1, T, hs)
    sin = torch.cat([sin_cache[position_ids]] * 2, dim=-1)[:, None]
    first, second = x.chunk(2, dim=-1)  # (B, n, T, hs/2) each
    return x * cos + torch.cat([-second, first], dim=-1) * sin


@torch.library.custom_op("ferry::self_attention", mutates_args=())
def self_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   past_key: torch.Tensor | None, past_value: torch.Tensor | None,
                   bias: torch.Tensor, num_heads: int, kv_num_heads: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected (B, T, nh·hs) query and (B, T, nkv·hs) key/value, the (B, nkv, P, hs) cache (or
    None) and a (B|1, 1, T, P+T) additive bias → (B, T, nh·hs) output and the (B, nkv, P+T, hs)
    cache. With fewer key/value heads than query heads (grouped-query attention) it is a
    decoder's causal self-attention, which ONNX Runtime's kernel leaves at 0 for a query that
    sees no key (a padded prompt position), where this averages the padding: such positions feed
    nothing, see `ferry.runtime.parity.compared_positions`."""
    from ferry.model.attention import exported_attention

    k, v = _heads(key, kv_num_heads), _heads(value, kv_num_heads)  # (B, nkv, T, hs)
    if past_key is not None and past_value is not None:
        k, v = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
    y = exported_attention(_heads(query, num_heads), k, v, bias)  # (B, nh, T, hs)
    return _merged(y), k.contiguous(), v.contiguous()


@self_attention.register_fake
def _(query, key, value, past_key, past_value, bias, num_heads, kv_num_heads):
    B, T, D = query.shape
    total = T + (past_key.shape[2] if past_key is not None else 0)
    cache = query.new_empty(B, kv_num_heads, total, D // num_heads)
    return query.new_empty(B, T, D), cache, torch.empty_like(cache)


@torch.library.custom_op("ferry::cross_attention", mutates_args=())
def cross_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    bias: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Projected (B, T, D) query over precomputed (B, nh, S, hs) keys/values with a
    (B, 1, T, S) additive bias → (B, T, D)."""
    from ferry.model.attention import exported_attention

    return _merged(exported_attention(_heads(query, num_heads), key, value, bias))


@cross_attention.register_fake
def _(query, key, value, bias, num_heads):
    return torch.empty_like(query)


@torch.library.custom_op("ferry::cached_self_attention", mutates_args=())
def cached_self_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          past_key: torch.Tensor, past_value: torch.Tensor,
                          position: torch.Tensor, bias: torch.Tensor,
                          cos_cache: torch.Tensor | None, sin_cache: torch.Tensor | None,
                          position_ids: torch.Tensor | None, num_heads: int,
                          kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal self-attention over a static cache: projected (B, T, nh·hs) query and
    (B, T, nkv·hs) key/value, the (B, nkv, capacity, hs) buffers, the (1,) positions already
    cached and a (B|1, 1|nh, T, capacity) additive bias (causal, plus a decoder-only model's
    padding and any relative position bias) → (B, T, nh·hs) output and the buffers with the new
    keys/values at position … position+T-1. Given rotary tables ((length, hs/2) cos and sin)
    and (B, T) position ids, the new queries and keys are rotated first."""
    from ferry.model.attention import exported_attention

    q = _rotated(_heads(query, num_heads), cos_cache, sin_cache, position_ids)  # (B, nh, T, hs)
    k = _rotated(_heads(key, kv_num_heads), cos_cache, sin_cache, position_ids)  # (B, nkv, T, hs)
    cache = StaticKeyValue(past_key.clone(), past_value.clone(), position)  # inputs stay as given
    keys, values = cache.write(k, _heads(value, kv_num_heads))
    y = exported_attention(q, keys, values, bias)  # (B, nh, T, hs)
    return _merged(y), keys, values


@cached_self_attention.register_fake
def _(query, key, value, past_key, past_value, position, bias, cos_cache, sin_cache,
      position_ids, num_heads, kv_num_heads):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)
