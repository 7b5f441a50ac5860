"""fp16 and bf16 graph variants, made at the ONNX level (what TensorRT's strongly typed networks
and GPU providers build as is).

The fp32 graph is cast with onnxruntime's float16 converter: graph inputs and outputs stay fp32
(a Cast at each), weights and activations become 16-bit, and the ops that overflow or lose too much
in 16 bits stay fp32 (`KEEP_FP32_OPS`: LayerNormalization, Softmax, reductions, exp/log/pow,
position arithmetic). The bf16 variant is the same graph retyped to bfloat16, its weights rounded
from the fp32 originals.

ONNX Runtime's CPU provider runs fp16 graphs (it inserts casts around ops lacking fp16 kernels) but
has no bf16 kernels, so a bf16 graph is measured on CPUs through `emulated_in_fp32`: each op
computes in fp32 on inputs that were rounded to bf16 and rounds its output back to bf16 — bf16
storage with fp32 arithmetic, as GPUs' bf16 matmuls with fp32 accumulation do.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ferry.export.onnx_export import external_data_file

KEEP_FP32_OPS = (
    "LayerNormalization", "Softmax", "LogSoftmax",
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceLogSumExp",
    "Pow", "Sqrt", "Exp", "Log", "Erf",
    "Range", "CumSum", "TopK", "Min", "Max",  # onnxruntime's own float16 block list
)


def _save(model: onnx.ModelProto, source: Path, target: Path) -> None:
    """Save beside `source`'s layout: a graph whose fp32 weights needed a side file keeps one."""
    external = external_data_file(source).exists()
    onnx.save(model, str(target), save_as_external_data=external,
              location=external_data_file(target).name if external else None)


def cast_to_fp16(source: Path) -> onnx.ModelProto:
    """The fp16 form of the fp32 graph at `source`: I/O fp32, `KEEP_FP32_OPS` fp32, everything
    else fp16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # given a path, the converter infers shapes file to file (which works past 2 GB)
    converted = convert_float_to_float16(str(source), keep_io_types=True,
                                         op_block_list=list(KEEP_FP32_OPS))
    # the converter leaves value_info entries whose types contradict the converted graph;
    # dropped, they are inferred again by whoever reads the graph
    del converted.graph.value_info[:]
    return topologically_sorted(converted)


def retype_fp16_to_bf16(fp16: onnx.ModelProto, fp32: onnx.ModelProto) -> onnx.ModelProto:
    """The bf16 form: every fp16 tensor, cast and constant of `fp16` becomes bf16; weights are
    rounded from their fp32 originals in `fp32` (not twice, through fp16)."""
    originals = {t.name: t for t in fp32.graph.initializer}
    model = onnx.ModelProto()
    model.CopyFrom(fp16)

    def retype(tensor: TensorProto) -> None:
        if tensor.data_type != TensorProto.FLOAT16:
            return
        source = originals.get(tensor.name)
        values = numpy_helper.to_array(source if source is not None and
                                       source.data_type == TensorProto.FLOAT else tensor)
        tensor.CopyFrom(bf16_tensor(tensor.name, values))

    for tensor in model.graph.initializer:
        retype(tensor)
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.BFLOAT16
            if attribute.type == onnx.AttributeProto.TENSOR:
                retype(attribute.t)
    for value in (*model.graph.input, *model.graph.output):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    return model


def bf16_tensor(name: str, values: np.ndarray) -> TensorProto:
    """A BFLOAT16 initializer holding `values` rounded to nearest-even bf16."""
    bits = values.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    tensor = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=values.shape)
    tensor.raw_data = bits.tobytes()
    return tensor


def emulated_in_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A CPU-runnable stand-in for a bf16 graph: every non-Cast node with bf16 inputs or outputs
    computes in fp32 between Casts (bf16 → fp32 before, fp32 → bf16 after), so values are rounded
    to bf16 at exactly the points the bf16 graph stores them."""
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    bf16 = TensorProto.BFLOAT16
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Cast" or not any(types.get(n) == bf16
                                             for n in (*node.input, *node.output)):
            nodes.append(node)
            continue
        for position, name in enumerate(node.input):
            if types.get(name) == bf16:
                widened = f"{name}__fp32_for_{node.name}_{position}"
                nodes.append(helper.make_node("Cast", [name], [widened], to=TensorProto.FLOAT))
                node.input[position] = widened
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == bf16:
                attribute.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(attribute.t).astype(np.float32), attribute.t.name))
        rounded = []
        for position, name in enumerate(node.output):
            if types.get(name) == bf16:
                wide = f"{name}__fp32"
                rounded.append(helper.make_node("Cast", [wide], [name], to=bf16))
                node.output[position] = wide
        nodes += [node, *rounded]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]  # stale for the widened tensors; ONNX Runtime infers its own
    return model


def topologically_sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph's nodes in dependency order (ONNX requires it; the fp16 converter appends its
    input casts at the end)."""
    graph = model.graph
    produced_by = {out: i for i, node in enumerate(graph.node) for out in node.output}
    waiting_on = [0] * len(graph.node)
    consumers: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in set(node.input):
            if name in produced_by:
                waiting_on[i] += 1
                consumers.setdefault(produced_by[name], []).append(i)
    ready = deque(i for i, count in enumerate(waiting_on) if count == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for j in consumers.get(i, []):
            waiting_on[j] -= 1
            if waiting_on[j] == 0:
                ready.append(j)
    if len(order) != len(graph.node):
        raise ValueError(f"graph {graph.name} has a cycle")
    nodes = [graph.node[i] for i in order]
    sorted_model = onnx.ModelProto()
    sorted_model.CopyFrom(model)
    del sorted_model.graph.node[:]
    sorted_model.graph.node.extend(nodes)
    return sorted_model


def write_fp16(source: Path, target: Path) -> None:
    """`target` = the fp16 variant of the fp32 graph at `source`."""
    _save(cast_to_fp16(source), source, target)


def write_bf16(source: Path, target: Path) -> None:
    """`target` = the bf16 variant of the fp32 graph at `source`."""
    _save(retype_fp16_to_bf16(cast_to_fp16(source), onnx.load(str(source))), source, target)
