"""The `fused` variant: fp32 graphs for ONNX Runtime only, with its fused transformer kernels.

Kept apart from the portable graphs (which TensorRT and any ONNX runtime can run): each graph is
exported again from the model with attention as ONNX Runtime's contrib kernels, one node per
attention instead of ≈ 15 (head split, scaled scores, mask, softmax, values, head merge):
`com.microsoft.MultiHeadAttention`, and `com.microsoft.GroupQueryAttention` for every
`decoder_step`, run over a static cache (`static_cache_step_spec`: the past and present K/V are
one buffer per layer that the kernel writes in place, so decoding never copies the cache; the
causal mask, the left padding of a decoder-only model's prompts and of rows that joined a
running batch, and T5's relative position bias are its attention bias) and for the prompt's
causal self-attention in models with grouped-query attention (Llama, Mistral, Qwen: the cache
stays at the key/value heads).
Then onnxruntime's transformer optimizer fuses residual + LayerNorm into
`SkipLayerNormalization` (and GELU patterns into `BiasGelu` / `FastGelu`), and the weight matmuls
reading one input are packed into one (`ferry.export.packed_projections`: a layer's query, key
and value; a gated feed-forward's gate and up). Every other graph keeps the portable graphs'
inputs and outputs exactly.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx.defs import OpSchema

from ferry.export.onnx_export import export_graph, external_data_file, quiet_loggers
from ferry.export.packed_projections import pack_projections
from ferry.graph_spec import GraphSpec, static_cache_step_spec
from ferry.model.fused_attention import fused_attention_export
from ferry.model.graphs import StaticCacheStepGraph


def _contrib_op(name: str, inputs: list[OpSchema.FormalParameter],
                outputs: list[OpSchema.FormalParameter], attributes: tuple[str, ...]):
    """onnxscript's handle on the ONNX Runtime contrib op `com.microsoft.<name>`. Its schema is
    not in the onnx package, so it is declared here: the inputs, outputs and int attributes ferry
    uses, as ONNX Runtime documents them (type T: float tensors, M: int32, I: int64 tensors)."""
    import onnxscript
    from onnxscript.values import Op

    schema = OpSchema(
        name, "com.microsoft", 1, inputs=inputs, outputs=outputs,
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors"),
                          ("M", ["tensor(int32)"], "int32 tensors"),
                          ("I", ["tensor(int64)"], "int64 tensors")],
        attributes=[OpSchema.Attribute(attribute, OpSchema.AttrType.INT, attribute,
                                       required=True) for attribute in attributes])
    return Op(onnxscript.values.Opset("com.microsoft", 1), name, schema)


def _multi_head_attention(outputs: int):
    """`com.microsoft.MultiHeadAttention` with its first `outputs` outputs (output,
    present_key, present_value)."""
    parameter, option = OpSchema.FormalParameter, OpSchema.FormalParameterOption
    inputs = [parameter(name, "M" if name == "key_padding_mask" else "T",
                        param_option=option.Single if name == "query" else option.Optional)
              for name in ("query", "key", "value", "bias", "key_padding_mask",
                           "attention_bias", "past_key", "past_value")]
    returned = [parameter("output", "T"),
                parameter("present_key", "T", param_option=option.Optional),
                parameter("present_value", "T", param_option=option.Optional)][:outputs]
    return _contrib_op("MultiHeadAttention", inputs, returned, ("num_heads",))


def _group_query_attention(rotary: bool):
    """`com.microsoft.GroupQueryAttention`: causal attention with `kv_num_heads` key/value
    heads shared by groups of the `num_heads` query heads, whose past and present K/V may be one
    buffer, written in place; an optional additive `attention_bias` (the padding mask). With
    `rotary` (attributes `do_rotary`, `rotary_interleaved`) it rotates the new queries and keys
    by the `position_ids` rows of its `cos_cache` / `sin_cache` tables."""
    parameter, option = OpSchema.FormalParameter, OpSchema.FormalParameterOption
    types = {"seqlens_k": "M", "total_sequence_length": "M", "position_ids": "I"}
    optional = ("past_key", "past_value", "cos_cache", "sin_cache", "position_ids",
                "attention_bias")
    inputs = [parameter(name, types.get(name, "T"),
                        param_option=option.Optional if name in optional else option.Single)
              for name in ("query", "key", "value", "past_key", "past_value", "seqlens_k",
                           "total_sequence_length", "cos_cache", "sin_cache", "position_ids",
                           "attention_bias")]
    outputs = [parameter(name, "T") for name in ("output", "present_key", "present_value")]
    attributes = ("num_heads", "kv_num_heads") + (("do_rotary", "rotary_interleaved")
                                                  if rotary else ())
    return _contrib_op("GroupQueryAttention", inputs, outputs, attributes)


def _translations() -> dict:
    """The fused attention operators → one contrib node each."""
    from onnxscript import INT32
    from onnxscript import opset18 as op

    with_cache, output_only = _multi_head_attention(3), _multi_head_attention(1)
    grouped, rotating = _group_query_attention(rotary=False), _group_query_attention(rotary=True)

    def group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_length,
                              cos_cache, sin_cache, position_ids, bias, num_heads: int,
                              kv_num_heads: int):
        if cos_cache is None:
            return grouped(query, key, value, past_key, past_value, seqlens_k, total_length,
                           None, None, None, bias, num_heads=num_heads,
                           kv_num_heads=kv_num_heads)
        return rotating(query, key, value, past_key, past_value, seqlens_k, total_length,
                        cos_cache, sin_cache, position_ids, bias, num_heads=num_heads,
                        kv_num_heads=kv_num_heads, do_rotary=1, rotary_interleaved=0)

    def counts(rows, total):
        """GroupQueryAttention's counts from the (1,) int64 positions attended over: per row
        of `rows` (a (B, …) tensor) seqlens_k = total - 1, (B,) int32, and the total as an int32
        scalar. Computed from tensors every layer shares (the bias, the position ids) where the
        graph has them, so ONNX Runtime's common-subexpression pass leaves one set of these
        nodes instead of one per layer."""
        seqlens_k = op.Cast(op.Expand(op.Sub(total, op.Constant(value_ints=[1])),
                                      op.Shape(rows, start=0, end=1)), to=INT32.dtype)
        return seqlens_k, op.Cast(op.Squeeze(total), to=INT32.dtype)

    def self_attention(query, key, value, past_key, past_value, bias, num_heads: int,
                       kv_num_heads: int):
        # (B, T, nh·hs) q, (B, T, nkv·hs) k/v, (B, nkv, P, hs) cache → output, cache appended
        if kv_num_heads == num_heads:
            return with_cache(query, key, value, None, None, bias, past_key, past_value,
                              num_heads=num_heads)
        # grouped-query (a decoder's, causal): every row holds all P + T positions (left
        # padding is masked by the bias), so seqlens_k = P + T - 1 for each row
        total = op.Shape(bias, start=3, end=4)  # (1,) int64: P + T, the bias's columns
        seqlens_k, total_length = counts(query, total)
        return group_query_attention(query, key, value, past_key, past_value, seqlens_k,
                                     total_length, None, None, None, bias, num_heads,
                                     kv_num_heads)

    def cross_attention(query, key, value, bias, num_heads: int):
        # keys/values already (B, nh, S, hs): the kernel's "BNSH" cross-attention layout
        return output_only(query, key, value, None, None, bias, num_heads=num_heads)

    def cached_self_attention(query, key, value, past_key, past_value, position, bias,
                              cos_cache, sin_cache, position_ids, num_heads: int,
                              kv_num_heads: int):
        # (B, T, nh·hs) q, (B, T, nkv·hs) k/v, (B, nkv, capacity, hs) buffers written in place;
        # the kernel takes a bias over the P + T positions written so far, not the capacity
        total = op.Add(position, op.Shape(bias, start=2, end=3))  # (1,) int64: P + T
        seqlens_k, total_length = counts(query if position_ids is None else position_ids,
                                         total)
        bias = op.Slice(bias, op.Constant(value_ints=[0]), total, op.Constant(value_ints=[3]))
        return group_query_attention(query, key, value, past_key, past_value, seqlens_k,
                                     total_length, cos_cache, sin_cache, position_ids, bias,
                                     num_heads, kv_num_heads)

    return {torch.ops.ferry.self_attention.default: self_attention,
            torch.ops.ferry.cross_attention.default: cross_attention,
            torch.ops.ferry.cached_self_attention.default: cached_self_attention}


def export_fused(module: torch.nn.Module, spec: GraphSpec, path: Path, *, opset: int) -> None:
    """Export `module` (a `ferry.model.graphs` wrapper) to `path` with fused attention, then
    let onnxruntime's transformer optimizer fuse what else it recognises. `decoder_step` is
    exported over a static cache (`static_cache_step_spec`)."""
    model = module.model
    config = model.config
    if spec.name == "decoder_step":
        module, spec = StaticCacheStepGraph(model), static_cache_step_spec(spec)
    with fused_attention_export(model):
        export_graph(module, spec, path, vocab_size=config.vocab_size, opset=opset,
                     translations=_translations())
    _optimize(path, num_heads=config.num_heads, d_model=config.d_model)


def _optimize(path: Path, *, num_heads: int, d_model: int) -> None:
    """onnxruntime's transformer optimizer (BERT-style fusions, no ONNX Runtime graph passes,
    so the file stays runnable by any ONNX Runtime provider), in place."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    external = external_data_file(path).exists()
    with quiet_loggers("onnxruntime.transformers"):
        options = FusionOptions("bert")
        options.enable_attention = False  # attention is already one node; its BERT pattern
        # matcher would only look for subgraphs that are not there
        model = optimize_model(str(path), model_type="bert", num_heads=num_heads,
                               hidden_size=d_model, optimization_options=options, opt_level=0)
        pack_projections(model.model)
        if external:
            external_data_file(path).unlink()
        model.save_model_to_file(str(path), use_external_data_format=external,
                                 all_tensors_to_one_file=True)
    _declare_simplified_layer_normalization()
    onnx.checker.check_model(str(path))


def _declare_simplified_layer_normalization() -> None:
    """Make `SimplifiedLayerNormalization` (RMSNorm: the optimizer's fusion for T5 and Llama
    norms) known to the onnx checker. ONNX Runtime registers it in the default ONNX domain, where
    the checker, unlike for `com.microsoft` ops, refuses an op it has no schema for."""
    if onnx.defs.has("SimplifiedLayerNormalization"):
        return
    parameter, option = OpSchema.FormalParameter, OpSchema.FormalParameterOption
    attribute = OpSchema.Attribute
    onnx.defs.register_schema(OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        inputs=[parameter("X", "T"), parameter("scale", "V")],
        outputs=[parameter("Y", "V"), parameter("inv_std_var", "U",
                                                param_option=option.Optional)],
        type_constraints=[(name, ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], name)
                          for name in ("T", "U", "V")],
        attributes=[attribute("axis", OpSchema.AttrType.INT, "axis", required=False),
                    attribute("epsilon", OpSchema.AttrType.FLOAT, "epsilon", required=False),
                    attribute("stash_type", OpSchema.AttrType.INT, "stash type",
                              required=False)]))


def fused_node_counts(path: Path) -> dict[str, int]:
    """How many nodes of each ONNX Runtime contrib op a graph holds (for reports and tests)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
