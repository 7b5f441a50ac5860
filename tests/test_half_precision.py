"""The 16-bit graph rewrites on small hand-made graphs: casting keeps I/O and norms fp32, the bf16
retyping rounds weights from fp32, and the CPU emulation of a bf16 graph computes exactly what
bf16 storage with fp32 arithmetic gives."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from ferry.export.half_precision import (
    emulated_in_fp32,
    topologically_sorted,
    write_bf16,
    write_fp16,
)


def _graph(path, weight: np.ndarray) -> None:
    """y = LayerNorm(x @ W) + 1, fp32, x: (batch, 4)."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
             helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], name="norm",
                              axis=-1),
             helper.make_node("Add", ["n", "one"], ["y"], name="add")]
    inits = [numpy_helper.from_array(weight, "W"),
             numpy_helper.from_array(np.ones(3, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(3, np.float32), "beta"),
             numpy_helper.from_array(np.ones(1, np.float32), "one")]
    graph = helper.make_graph(nodes, "toy",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
                              inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _run(model_or_path, x: np.ndarray) -> np.ndarray:
    source = model_or_path if isinstance(model_or_path, str) else \
        model_or_path.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


def _bf16(a: np.ndarray) -> np.ndarray:
    return a.astype(ml_dtypes.bfloat16).astype(np.float32)


def _layer_norm(h: np.ndarray) -> np.ndarray:
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    return (h - mean) / np.sqrt(var + 1e-5)


def test_fp16_and_bf16_variants_compute_in_16_bits_with_fp32_io_and_norms(tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 3)).astype(np.float32) * 3.0 + 0.001
    x = rng.normal(size=(5, 4)).astype(np.float32)
    _graph(tmp_path / "g.onnx", weight)
    write_fp16(tmp_path / "g.onnx", tmp_path / "g.fp16.onnx")
    write_bf16(tmp_path / "g.onnx", tmp_path / "g.bf16.onnx")

    fp16 = onnx.load(str(tmp_path / "g.fp16.onnx"))
    bf16 = onnx.load(str(tmp_path / "g.bf16.onnx"))
    for model, half in ((fp16, TensorProto.FLOAT16), (bf16, TensorProto.BFLOAT16)):
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)  # types are consistent
        types = {t.name: t.data_type for t in model.graph.initializer}
        assert types["W"] == half and types["gamma"] == TensorProto.FLOAT
        assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
        norm = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
        producer = next(n for n in model.graph.node if norm.input[0] in n.output)
        assert producer.op_type == "Cast"  # the norm reads fp32
    stored = numpy_helper.to_array(next(t for t in bf16.graph.initializer if t.name == "W"))
    assert np.array_equal(stored.astype(np.float32), _bf16(weight))  # one rounding, from fp32

    h16 = (x.astype(np.float16) @ weight.astype(np.float16)).astype(np.float32)
    expected16 = _layer_norm(h16).astype(np.float16).astype(np.float32) + 1
    assert np.allclose(_run(str(tmp_path / "g.fp16.onnx"), x), expected16, atol=3e-3)

    emulated = _run(emulated_in_fp32(bf16), x)
    h = _bf16(_bf16(x) @ _bf16(weight))  # bf16 in, fp32 arithmetic, bf16 out
    expected = _bf16(_bf16(_layer_norm(h)) + 1)  # the norm in fp32, its output stored in bf16
    assert np.allclose(emulated, expected, atol=1e-6, rtol=1e-6)
    assert not np.allclose(emulated, _run(str(tmp_path / "g.onnx"), x), atol=1e-4)


def test_topological_sort_puts_producers_first():
    nodes = [helper.make_node("Relu", ["a"], ["b"], name="second"),
             helper.make_node("Neg", ["x"], ["a"], name="first"),
             helper.make_node("Add", ["a", "b"], ["y"], name="third")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    ordered = topologically_sorted(model)
    assert [n.name for n in ordered.graph.node] == ["first", "second", "third"]
    onnx.checker.check_model(ordered)
