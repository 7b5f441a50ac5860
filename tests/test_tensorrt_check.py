"""The static TensorRT check (no TensorRT needed): every graph ferry exports passes it, and each
kind of problem is reported with the offending node's name."""

from __future__ import annotations

import json

import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper

from ferry.cli import main
from ferry.export.tensorrt_check import (
    check_bundle_for_tensorrt,
    check_graph_for_tensorrt,
    supported_operators,
)
from ferry.graph_spec import DimRange, GraphSpec, TensorSpec
from ferry.runtime import Bundle


def test_every_exported_graph_passes(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    checks = check_bundle_for_tensorrt(bundle)
    assert [c.graph for c in checks] == ["encoder", "decoder_init", "decoder_step"]
    assert all(c.passed for c in checks), [c.problems for c in checks]
    assert all(17 <= c.opset <= 20 for c in checks)
    assert "LayerNormalization" in checks[0].op_types


def test_profiles_come_from_the_spec_ranges(tiny_bundle):
    spec = Bundle.open(tiny_bundle).graphs["decoder_step"]
    profile = spec.profile_shapes()
    batch, src, past = spec.dims["batch"], spec.dims["src_len"], spec.dims["past_len"]
    assert profile["input_ids"] == ((batch.min, 1), (batch.opt, 1), (batch.max, 1))
    heads, head_dim = spec.input("past_key_0").shape[1], spec.input("past_key_0").shape[3]
    assert profile["past_key_0"][2] == (batch.max, heads, past.max, head_dim)
    assert profile["encoder_attention_mask"][0] == (batch.min, src.min)
    assert set(profile) == set(spec.input_names)


def _spec() -> GraphSpec:
    return GraphSpec(name="toy", inputs=(TensorSpec("x", "float32", ("batch", 4)),),
                     outputs=(TensorSpec("y", "float32", ("batch", 4)),),
                     dims={"batch": DimRange(1, 2, 8)})


def _model(nodes, *, opset=18, input_dim="batch") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [input_dim, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [input_dim, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_each_kind_of_problem_names_its_node():
    support = supported_operators()
    relu = helper.make_node("Relu", ["x"], ["y"], name="fine_relu")
    assert check_graph_for_tensorrt(_model([relu]), _spec(), "toy.onnx", support).passed

    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "b", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    control = helper.make_node("If", ["x"], ["y"], name="the_if", then_branch=branch,
                               else_branch=branch)
    unsupported = helper.make_node("MatMulInteger", ["x", "x"], ["y"], name="int_matmul")
    custom = helper.make_node("FusedThing", ["x"], ["y"], name="fused", domain="com.example")
    problems = check_graph_for_tensorrt(_model([control, unsupported, custom], opset=16,
                                               input_dim="length"),
                                        _spec(), "toy.onnx", support).problems
    text = "\n".join(problems)
    assert "the_if (If) is control flow" in text
    assert "int_matmul (MatMulInteger) is not supported by TensorRT 10.0" in text
    assert "fused (FusedThing) is in custom domain 'com.example'" in text
    assert "opset 16 is outside" in text
    assert "dynamic dim 'length' has no min/opt/max range" in text


def test_cli_check_reports_and_sets_the_exit_status(tiny_bundle):
    runner = CliRunner()
    passed = runner.invoke(main, ["export", "tensorrt", str(tiny_bundle), "--check", "--json"])
    assert passed.exit_code == 0, passed.output
    report = json.loads(passed.output)
    assert report["passed"] and len(report["graphs"]) == 3
    table = runner.invoke(main, ["export", "tensorrt", str(tiny_bundle), "--check"])
    assert table.exit_code == 0 and "TensorRT check PASS" in table.output
    no_check = runner.invoke(main, ["export", "tensorrt", str(tiny_bundle)])
    assert no_check.exit_code == 2 and "--check" in no_check.output
