"""The `fused` variant: fp32 graphs for ONNX Runtime only, with its fused transformer kernels.

Kept apart from the portable graphs (which TensorRT and any ONNX runtime can run): each graph is
exported again from the model with attention as ONNX Runtime's `com.microsoft.MultiHeadAttention`
(one node per attention instead of ≈ 15: head split, scaled scores, mask, softmax, values, head
merge and, for self-attention, the KV-cache append), then passed through onnxruntime's transformer
optimizer, which fuses residual + LayerNorm into `SkipLayerNormalization` (and GELU patterns into
`BiasGelu` / `FastGelu`). The graphs keep the portable graphs' inputs and outputs exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch
from onnx.defs import OpSchema

from ferry.export.onnx_export import export_graph, external_data_file
from ferry.graph_spec import GraphSpec
from ferry.model.fused_attention import fused_attention_export

MULTI_HEAD_ATTENTION_INPUTS = ("query", "key", "value", "bias", "key_padding_mask",
                               "attention_bias", "past_key", "past_value")


def _multi_head_attention(outputs: int):
    """onnxscript's handle on `com.microsoft.MultiHeadAttention` with its first `outputs`
    outputs (output, present_key, present_value). The contrib schema is not in the onnx
    package, so it is declared here: the inputs and attribute ferry uses, as ONNX Runtime
    documents them."""
    import onnxscript
    from onnxscript.values import Op

    parameter, option = OpSchema.FormalParameter, OpSchema.FormalParameterOption
    inputs = [parameter(name, "M" if name == "key_padding_mask" else "T",
                        param_option=option.Single if name == "query" else option.Optional)
              for name in MULTI_HEAD_ATTENTION_INPUTS]
    returned = [parameter("output", "T"),
                parameter("present_key", "T", param_option=option.Optional),
                parameter("present_value", "T", param_option=option.Optional)][:outputs]
    schema = OpSchema(
        "MultiHeadAttention", "com.microsoft", 1, inputs=inputs, outputs=returned,
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float tensors"),
                          ("M", ["tensor(int32)"], "key padding mask")],
        attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "heads",
                                       required=True)])
    return Op(onnxscript.values.Opset("com.microsoft", 1), "MultiHeadAttention", schema)


def _translations() -> dict:
    """`ferry::self_attention` / `ferry::cross_attention` → one MultiHeadAttention node each."""
    with_cache, output_only = _multi_head_attention(3), _multi_head_attention(1)

    def self_attention(query, key, value, past_key, past_value, bias, num_heads: int):
        # (B, T, D) q/k/v, (B, nh, P, hs) cache → output, cache appended: (B, nh, P+T, hs)
        return with_cache(query, key, value, None, None, bias, past_key, past_value,
                          num_heads=num_heads)

    def cross_attention(query, key, value, bias, num_heads: int):
        # keys/values already (B, nh, S, hs): the kernel's "BNSH" cross-attention layout
        return output_only(query, key, value, None, None, bias, num_heads=num_heads)

    return {torch.ops.ferry.self_attention.default: self_attention,
            torch.ops.ferry.cross_attention.default: cross_attention}


def export_fused(module: torch.nn.Module, spec: GraphSpec, path: Path, *, vocab_size: int,
                 opset: int, num_heads: int, d_model: int) -> None:
    """Export `module` (a `ferry.model.graphs` wrapper) to `path` with fused attention, then
    let onnxruntime's transformer optimizer fuse what else it recognises."""
    with fused_attention_export():
        export_graph(module, spec, path, vocab_size=vocab_size, opset=opset,
                     translations=_translations())
    _optimize(path, num_heads=num_heads, d_model=d_model)


def _optimize(path: Path, *, num_heads: int, d_model: int) -> None:
    """onnxruntime's transformer optimizer (BERT-style fusions, no ONNX Runtime graph passes,
    so the file stays runnable by any ONNX Runtime provider), in place."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    external = external_data_file(path).exists()
    quiet = logging.getLogger("onnxruntime.transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        options = FusionOptions("bert")
        options.enable_attention = False  # attention is already one node; its BERT pattern
        # matcher would only look for subgraphs that are not there
        model = optimize_model(str(path), model_type="bert", num_heads=num_heads,
                               hidden_size=d_model, optimization_options=options, opt_level=0)
        if external:
            external_data_file(path).unlink()
        model.save_model_to_file(str(path), use_external_data_format=external,
                                 all_tensors_to_one_file=True)
    finally:
        quiet.setLevel(level)
    onnx.checker.check_model(str(path))


def fused_node_counts(path: Path) -> dict[str, int]:
    """How many nodes of each ONNX Runtime contrib op a graph holds (for reports and tests)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
