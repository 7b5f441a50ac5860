"""Multi-head scaled dot-product attention with an explicit KV cache.

The cache is passed in and returned, never hidden in module state: export turns it into graph
inputs/outputs (`past_*` → `present_*`), and the runtime owns it between steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ferry.model import fused_attention  # noqa: F401  (registers the ferry:: operators)
from ferry.model.config import TransformerConfig
from ferry.model.kv_cache import StaticKeyValue
from ferry.model.norms import RMSNorm
from ferry.model.rotary import Rotation, rotate

KeyValue = tuple[torch.Tensor, torch.Tensor]  # (B, nkv, T, hs) each
KERNEL_ROTARY_HEAD_MULTIPLE = 16  # GroupQueryAttention's rotary option needs heads this wide


class MultiHeadAttention(nn.Module):
    """Multi-head attention (Vaswani et al. §3.2.2) over `F.scaled_dot_product_attention`, with
    the options of later families (see `TransformerConfig`): grouped-query attention (fewer
    key/value heads than query heads), rotary positions, per-head query/key RMSNorm, projection
    biases, and unscaled scores.

    `export_fused` (off unless `ferry.model.fused_attention.fused_attention_export` turns it on
    for an export) makes an exporting layer one fused attention operator.
    """

    def __init__(self, config: TransformerConfig, *, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal  # a decoder's self-attention (what a fused causal kernel may run)
        self.num_heads = config.num_heads
        self.num_kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5 if config.attention_scale == "inverse_sqrt" else 1.0
        self.dropout = config.dropout
        self.max_positions = config.max_positions  # the rotary kernel's table length
        self.export_fused = False
        # the attention probabilities (B, nh, T, S), through a module whose forward hooks see
        # them (`ferry.model.probes`); computed only where attention is written out: in the
        # exported portable graphs, and in torch while `written_out` (SDPA never forms them)
        self.probabilities = nn.Identity()
        self.written_out = False
        inner, kv_inner = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        qkv_bias = config.attention_bias in ("all", "qkv")
        self.q_proj = nn.Linear(config.d_model, inner, bias=qkv_bias)
        self.k_proj = nn.Linear(config.d_model, kv_inner, bias=qkv_bias)
        self.v_proj = nn.Linear(config.d_model, kv_inner, bias=qkv_bias)
        self.out_proj = nn.Linear(inner, config.d_model, bias=config.attention_bias == "all")
        self.q_norm = RMSNorm(self.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps=config.layer_norm_eps) if config.qk_norm else None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, heads, T, hs)

    def _queries(self, x: torch.Tensor, rotation: Rotation | None) -> torch.Tensor:
        """(B, T, D) → (B, nh, T, hs) queries, normed and rotated as configured."""
        q = self._split_heads(self.q_proj(x))
        q = self.q_norm(q) if self.q_norm is not None else q
        return rotate(q, rotation) if rotation is not None else q

    def key_value(self, x: torch.Tensor, rotation: Rotation | None = None) -> KeyValue:
        """Project (B, T, D) states into per-head keys and values, each (B, nkv, T, hs): keys
        normed and rotated as configured."""
        k, v = self._split_heads(self.k_proj(x)), self._split_heads(self.v_proj(x))
        k = self.k_norm(k) if self.k_norm is not None else k
        return (rotate(k, rotation) if rotation is not None else k), v

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_value: KeyValue | None = None,
        past: KeyValue | StaticKeyValue | None = None,
        bias: torch.Tensor | None = None,
        rotation: Rotation | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        """Attend from `x` (B, T, D).

        Self-attention: leave `key_value` unset; keys/values come from `x`, appended to `past`
        (or written into a `StaticKeyValue`'s buffers, which are then attended over whole).
        Cross-attention: pass the memory's precomputed `key_value` (computed once per request).

        Args:
            bias: additive mask (plus any position bias) broadcastable to (B, nh, T, S), see
                `ferry.model.masks`.
            rotation: the (cos, sin) of `x`'s positions under rotary embeddings.

        Returns:
            (B, T, D) output and the keys/values attended over, (B, nkv, S, hs) each: for
            self-attention that is the updated cache.
        """
        B, T, _ = x.shape
        if self.export_fused and torch.compiler.is_exporting() and bias is not None:
            fused = self._fused(x, key_value=key_value, past=past, bias=bias, rotation=rotation)
            if fused is not None:
                return fused
        q = self._queries(x, rotation)  # (B, nh, T, hs)
        if key_value is None:
            k, v = self.key_value(x, rotation)  # (B, nkv, T, hs)
            if isinstance(past, StaticKeyValue):
                k, v = past.write(k, v)  # (B, nkv, capacity, hs), written in place
            elif past is not None:
                k = torch.cat([past[0], k], dim=2)  # (B, nkv, P+T, hs)
                v = torch.cat([past[1], v], dim=2)
        else:
            k, v = key_value  # (B, nkv, S, hs)
        if torch.compiler.is_exporting() or self.written_out:
            y = exported_attention(q, k, v, bias, scale=self.scale,
                                   observe=self.probabilities)  # (B, nh, T, hs)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0,
                scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads,
            )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, nh·hs)
        return self.out_proj(y), (k, v)

    def _fused(self, x: torch.Tensor, *, key_value: KeyValue | None,
               past: KeyValue | StaticKeyValue | None, bias: torch.Tensor,
               rotation: Rotation | None) -> tuple[torch.Tensor, KeyValue] | None:
        """`forward` as one fused attention operator (see `ferry.model.fused_attention`), which
        takes (B, T, nh·hs) projections and scales scores by 1/√hs: queries and keys are normed
        before it, rotated by it in a decoder step's self-attention (GroupQueryAttention's
        rotary option, with per-position tables and the position ids; by the graph elsewhere, and
        where the kernel cannot: heads not a multiple of 16 wide), and unscaled attention
        pre-multiplies the queries by √hs. None
        where no kernel fits: grouped-query attention other than a decoder's causal
        self-attention (written out instead)."""
        if self.num_kv_heads != self.num_heads and (key_value is not None or not self.causal):
            return None
        B, T, _ = x.shape
        bias = bias.expand(-1, -1, T, -1)  # (B|1, 1|nh, T, S): the kernel wants T rows
        # a decoder step's rotary self-attention: GroupQueryAttention rotates queries and keys
        # (over a cache it honours the position ids; for a prompt, ONNX Runtime 1.2x-1.3x's CPU
        # kernel numbers positions itself, wrongly for left-padded rows)
        kernel_rotates = (rotation is not None and isinstance(past, StaticKeyValue)
                          and self.head_dim % KERNEL_ROTARY_HEAD_MULTIPLE == 0)
        rotated_here = None if kernel_rotates else rotation

        def merged(heads: torch.Tensor) -> torch.Tensor:
            return heads.transpose(1, 2).reshape(B, T, -1)  # (B, T, heads·hs)

        # with nothing done per head here (no norm, no rotation), the projections feed the
        # kernel as they are: no head split and merge (two Reshapes each in the graph)
        per_head = self.q_norm is not None or rotated_here is not None
        query = merged(self._queries(x, rotated_here)) if per_head else self.q_proj(x)
        if self.scale != self.head_dim**-0.5:  # the kernel scales by 1/√hs
            query = query * (self.scale * self.head_dim**0.5)  # (B, T, nh·hs)
        if key_value is not None:
            k, v = key_value
            y = torch.ops.ferry.cross_attention(query, k, v, bias, self.num_heads)
            return self.out_proj(y), (k, v)
        key, value = ((merged(t) for t in self.key_value(x, rotated_here)) if per_head
                      else (self.k_proj(x), self.v_proj(x)))  # (B, T, nkv·hs)
        cos_cache, sin_cache, position_ids = (
            (*rotation.tables(self.max_positions), rotation.positions.expand(B, T))
            if kernel_rotates else (None, None, None))  # (length, hs/2) × 2, (B, T)
        if isinstance(past, StaticKeyValue):  # the cache is written in place by the kernel
            y, k, v = torch.ops.ferry.cached_self_attention(
                query, key, value, past.keys, past.values, past.position, bias, cos_cache,
                sin_cache, position_ids, self.num_heads,
                self.num_kv_heads)  # (B, T, nh·hs), (B, nkv, capacity, hs) × 2
        else:
            past_key, past_value = past if past is not None else (None, None)
            y, k, v = torch.ops.ferry.self_attention(
                query, key, value, past_key, past_value, bias, self.num_heads,
                self.num_kv_heads)  # (B, T, nh·hs), (B, nkv, P+T, hs) × 2
        return self.out_proj(y), (k, v)


def exported_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       bias: torch.Tensor | None, *, scale: float | None = None,
                       observe: nn.Module | None = None) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias)·v written out (scale: 1/√hs unless given), the form export
    gives the ONNX graphs. (B, nh, T, hs) queries over (B, nkv, S, hs) keys/values → (B, nh, T, hs).

    The same function as `F.scaled_dot_product_attention` (export validates the graphs against
    the SDPA reference within 1e-4), but shaped for inference engines: the key transpose feeds
    the matmul directly, so ONNX Runtime folds it into the matmul (FusedMatMul) instead of
    transposing the whole KV cache at every step, as SDPA's decomposition (which scales q and k
    separately) makes it do.

    Grouped-query attention stacks each group's queries as rows against its shared key/value
    head (reshapes of contiguous tensors, no copy), so the cache is never repeated per head.
    `observe` is called on the (B, nh, T, S) probabilities (an identity module, for hooks).
    """
    B, nh, T, hs = q.shape
    groups = nh // k.shape[1]
    scale = hs**-0.5 if scale is None else scale
    q = q * scale if scale != 1.0 else q
    if groups > 1:
        q = q.reshape(B, k.shape[1], groups * T, hs)  # (B, nkv, g·T, hs)
    scores = torch.matmul(q, k.transpose(-2, -1))  # (B, nkv, g·T, S)
    if groups > 1:
        scores = scores.reshape(B, nh, T, -1)  # (B, nh, T, S)
    if bias is not None:
        scores = scores + bias
    probabilities = torch.softmax(scores, dim=-1)  # (B, nh, T, S)
    if observe is not None:  # an identity whose hooks record the probabilities
        probabilities = observe(probabilities)
    if groups > 1:
        probabilities = probabilities.reshape(B, k.shape[1], groups * T, -1)  # (B, nkv, g·T, S)
    return torch.matmul(probabilities, v).reshape(B, nh, T, hs)  # (B, nh, T, hs)
