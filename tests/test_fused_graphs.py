"""The `fused` variant: ONNX Runtime's contrib kernels (one attention node per attention,
SkipLayerNormalization) in graphs kept apart from the portable ones, token-identical to them in
every generation mode; the decoder step's self-attention writes a static cache in place; ONNX
Runtime only."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from test_generation import MODES

from ferry.export.fused_graphs import fused_node_counts
from ferry.export.tensorrt_check import check_bundle_for_tensorrt
from ferry.graph_spec import static_cache_step_spec
from ferry.runtime import Bundle, load
from ferry.runtime.backends.base import every_backend
from ferry.runtime.backends.onnxruntime import OrtCacheView, OrtStaticCacheStep

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def held_out(demo_run) -> list[str]:
    workdir, _, _ = demo_run
    lines = (workdir / "data" / "eval.jsonl").read_text().splitlines()[:48]
    return [json.loads(line)["source"] for line in lines]


def test_each_attention_is_one_node_and_the_step_writes_a_static_cache(demo_variants_bundle):
    bundle = Bundle.open(demo_variants_bundle)
    layers = bundle.model_config["num_encoder_layers"], bundle.model_config["num_decoder_layers"]
    expected = {  # decoder: self- and cross-attention per layer
        "encoder": {"MultiHeadAttention": layers[0]},
        "decoder_init": {"MultiHeadAttention": 2 * layers[1]},
        "decoder_step": {"MultiHeadAttention": layers[1], "GroupQueryAttention": layers[1]}}
    for name, spec in bundle.graphs.items():
        path = bundle.graph_file(name, "fused")
        counts = fused_node_counts(path)
        assert {k: v for k, v in counts.items() if "Attention" in k} == expected[name], counts
        assert counts["SkipLayerNormalization"] > 0, counts  # residual + LayerNorm fused too
        graph = onnx.load(str(path), load_external_data=False).graph
        io = static_cache_step_spec(spec) if name == "decoder_step" else spec
        assert [v.name for v in graph.input] == io.input_names
        assert [v.name for v in graph.output] == io.output_names
        assert not [n for n in graph.node if n.op_type == "Softmax"]  # inside the kernels now
    variant = bundle.manifest.variants["fused"]
    assert variant.token_agreement == 1.0
    assert max(variant.max_abs.values()) <= 1e-4  # fp32: the portable graphs' tolerance


def test_the_step_writes_each_new_key_into_the_cache_buffer_in_place(demo_variants_bundle):
    model = load(demo_variants_bundle, backend="onnxruntime:fused")
    step = model.graphs["decoder_step"]
    assert isinstance(step, OrtStaticCacheStep)
    ids, mask = model.codec.encode(["March 5, 2021", "12/25/2003"])
    encoded = model.graphs["encoder"].infer({"input_ids": ids, "attention_mask": mask})
    cross = {k: v for k, v in encoded.items() if k.startswith("cross_")}
    start = np.full((2, 1), model.special.decoder_start, dtype=np.int64)
    init = model.graphs["decoder_init"].infer({"input_ids": start,
                                               "encoder_attention_mask": mask, **cross})
    feed = {"input_ids": start, "attention_mask": np.ones((2, 2), np.int64),
            "encoder_attention_mask": mask, **cross,
            **{k.replace("present_", "past_"): v for k, v in init.items()
               if k.startswith("present_")}}
    first = step.infer(feed)
    second = step.infer({**feed, "attention_mask": np.ones((2, 3), np.int64),
                         **{k.replace("present_", "past_"): v for k, v in first.items()
                            if k.startswith("present_")}})
    before, after = first["present_key_0"], second["present_key_0"]
    assert isinstance(after, OrtCacheView) and after.shape[2] == 3 and after.capacity == 64
    assert after.full is before.full  # the same buffer, the new key written into it
    portable = load(demo_variants_bundle).graphs["decoder_step"].infer(feed)
    assert np.abs(np.asarray(before) - portable["present_key_0"]).max() < 1e-5
    assert np.abs(first["logits"] - portable["logits"]).max() < 1e-4


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
