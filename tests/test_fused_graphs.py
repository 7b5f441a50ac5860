"""The `fused` variant: ONNX Runtime's contrib kernels (one MultiHeadAttention node per attention,
SkipLayerNormalization) in graphs kept apart from the portable ones, with the same inputs and
outputs, token-identical to them in every generation mode; ONNX Runtime only."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_generation import MODES

from ferry.export.fused_graphs import fused_node_counts
from ferry.export.tensorrt_check import check_bundle_for_tensorrt
from ferry.runtime import Bundle, load
from ferry.runtime.backends.base import every_backend

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def held_out(demo_run) -> list[str]:
    workdir, _, _ = demo_run
    lines = (workdir / "data" / "eval.jsonl").read_text().splitlines()[:48]
    return [json.loads(line)["source"] for line in lines]


def test_each_attention_is_one_node_and_the_io_is_the_portable_graphs(demo_variants_bundle):
    bundle = Bundle.open(demo_variants_bundle)
    layers = bundle.model_config["num_encoder_layers"], bundle.model_config["num_decoder_layers"]
    expected = {"encoder": layers[0], "decoder_init": 2 * layers[1],
                "decoder_step": 2 * layers[1]}  # decoder: self- and cross-attention per layer
    for name, spec in bundle.graphs.items():
        path = bundle.graph_file(name, "fused")
        counts = fused_node_counts(path)
        assert counts["MultiHeadAttention"] == expected[name], counts
        assert counts["SkipLayerNormalization"] > 0, counts  # residual + LayerNorm fused too
        graph = onnx.load(str(path), load_external_data=False).graph
        assert [v.name for v in graph.input] == spec.input_names
        assert [v.name for v in graph.output] == spec.output_names
        assert not [n for n in graph.node if n.op_type == "Softmax"]  # inside the kernels now
    variant = bundle.manifest["variants"]["fused"]
    assert variant["token_agreement"] == 1.0
    assert max(variant["max_abs"].values()) <= 1e-4  # fp32: the portable graphs' tolerance


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_is_token_identical_to_the_portable_graphs(demo_variants_bundle, held_out,
                                                              mode):
    portable = load(demo_variants_bundle, backend="onnxruntime")
    fused = load(demo_variants_bundle, backend="onnxruntime:fused")
    ids, mask = portable.codec.encode(held_out)
    expected = portable.generate_output(ids, mask, max_new_tokens=14, **MODES[mode])
    got = fused.generate_output(ids, mask, max_new_tokens=14, **MODES[mode])
    assert np.array_equal(expected.sequences, got.sequences)
    assert np.allclose(expected.sequence_scores, got.sequence_scores, atol=1e-4)


def test_tensorrt_is_told_the_fused_graphs_are_not_for_it(demo_variants_bundle):
    bundle = Bundle.open(demo_variants_bundle)
    checks = check_bundle_for_tensorrt(bundle, "fused")
    assert not any(c.passed for c in checks)
    assert all(any("MultiHeadAttention" in p for p in c.problems) for c in checks)
    backends = every_backend(bundle.precisions)
    assert "onnxruntime:fused" in backends and "onnxruntime-cuda:fused" in backends
    assert "tensorrt:fused" not in backends and "onnxruntime-tensorrt:fused" not in backends
