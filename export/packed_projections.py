"""Weight matmuls that read one input packed into one matmul: fewer, wider kernel calls.

A decoder step at batch 1 is a chain of matrix-vector products, each reading its weights once;
small ones (a grouped-query layer's key and value projections: 896 × 128 in Qwen2.5-0.5B) run
far from the memory bandwidth a kernel reaches on a wide matrix, and every call costs a few
microseconds of scheduling. So the matmuls reading the same activations — a layer's query, key
and value projections, a gated feed-forward's gate and up projections — become one matmul over
their weights side by side:

- feeding `GroupQueryAttention`'s query, key and value (each maybe through a bias Add), the
  packed product is the kernel's packed-QKV input, as it is: no split;
- otherwise a `Split` along the last axis restores each original output by name, so every
  consumer stays as it was.

Exact in fp32 (the same dot products), and for block-wise int4 (each block is one column's);
dynamic int8 with one scale per weight tensor then shares a scale across the packed weights.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper


def pack_projections(model: onnx.ModelProto) -> int:
    """Pack, in place, every group of ≥ 2 MatMuls that multiply the same tensor by 2-D
    initializer weights of the same dtype and input width; returns how many groups."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    groups: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2:
            groups[node.input[0]].append(node)
    packed = 0
    for matmuls in groups.values():
        widths = {(initializers[m.input[1]].dims[0], initializers[m.input[1]].data_type)
                  for m in matmuls}
        if len(matmuls) < 2 or len(widths) != 1:
            continue
        _pack(graph, matmuls, initializers, consumers)
        packed += 1
    return packed


def _pack(graph: onnx.GraphProto, matmuls: list[onnx.NodeProto],
          initializers: dict[str, onnx.TensorProto],
          consumers: dict[str, list[onnx.NodeProto]]) -> None:
    weights = [numpy_helper.to_array(initializers[m.input[1]]) for m in matmuls]  # (K, Nᵢ) each
    first = matmuls[0]
    name = f"{first.name or first.output[0]}.packed"
    graph.initializer.append(numpy_helper.from_array(
        np.concatenate(weights, axis=1), name=f"{name}.weight"))  # (K, ΣNᵢ)
    attention = _attention_inputs(graph, matmuls, initializers, consumers)
    position = list(graph.node).index(first)
    if attention is not None:  # one product is the kernel's packed query input
        kernel, adds = attention
        new = [helper.make_node("MatMul", [first.input[0], f"{name}.weight"], [f"{name}.out"],
                                name=f"{name}.matmul")]
        packed_output = f"{name}.out"
        if adds:
            biases = [numpy_helper.to_array(initializers[_bias_of(add, initializers)])
                      for add in adds]
            graph.initializer.append(numpy_helper.from_array(np.concatenate(biases),
                                                             name=f"{name}.bias"))
            new.append(helper.make_node("Add", [packed_output, f"{name}.bias"],
                                        [f"{name}.biased"], name=f"{name}.add"))
            packed_output = f"{name}.biased"
        kernel.input[0], kernel.input[1], kernel.input[2] = packed_output, "", ""
        removed = matmuls + adds
    else:  # a Split gives every consumer its original tensor back
        graph.initializer.append(numpy_helper.from_array(
            np.array([w.shape[1] for w in weights], dtype=np.int64), name=f"{name}.split"))
        new = [helper.make_node("MatMul", [first.input[0], f"{name}.weight"], [f"{name}.out"],
                                name=f"{name}.matmul"),
               helper.make_node("Split", [f"{name}.out", f"{name}.split"],
                                [m.output[0] for m in matmuls], name=f"{name}.split", axis=-1)]
        removed = matmuls
    dtype = initializers[first.input[1]].data_type
    for node in new:  # typed, so that tools reading types (the int8 quantizer) know them
        if node.op_type != "Split":
            graph.value_info.append(helper.make_tensor_value_info(node.output[0], dtype, None))
    for node in removed:
        graph.node.remove(node)
    for offset, node in enumerate(new):
        graph.node.insert(position + offset, node)
    still_used = {name for node in graph.node for name in node.input}
    for name in {name for node in removed for name in node.input}:  # weights, biases no other
        if name in initializers and name not in still_used:  # node reads
            graph.initializer.remove(initializers.pop(name))


def _bias_of(add: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> str:
    return next(name for name in add.input if name in initializers)


def _attention_inputs(graph: onnx.GraphProto, matmuls: list[onnx.NodeProto],
                      initializers: dict[str, onnx.TensorProto],
                      consumers: dict[str, list[onnx.NodeProto]]
                      ) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """When `matmuls` (in order) are the query, key and value of one `GroupQueryAttention`,
    each read by it alone (directly, or all three through an Add of a 1-D bias initializer):
    that node and the Adds; else None."""
    if len(matmuls) != 3:
        return None
    outputs, adds = [], []
    for matmul in matmuls:
        users = consumers[matmul.output[0]]
        if len(users) != 1:
            return None
        user = users[0]
        bias = next((name for name in user.input if name in initializers), None)
        if (user.op_type == "Add" and bias is not None and len(initializers[bias].dims) == 1
                and len(consumers[user.output[0]]) == 1):
            adds.append(user)
            outputs.append(user.output[0])
        else:
            outputs.append(matmul.output[0])
    if adds and len(adds) != 3:
        return None
    kernels = {id(consumers[name][0]) for name in outputs if len(consumers[name]) == 1}
    kernel = consumers[outputs[0]][0] if len(consumers[outputs[0]]) == 1 else None
    if (kernel is None or len(kernels) != 1 or kernel.op_type != "GroupQueryAttention"
            or list(kernel.input[:3]) != outputs):
        return None
    return kernel, adds
