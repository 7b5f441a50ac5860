"""Graphs over protobuf's 2 GB limit keep their weights in a side file (`<graph>.onnx.data`):
exported, validated, checksummed, loaded and verified like any other bundle. The threshold is
lowered here so a tiny model takes the same path a > 2 GB one does."""

from __future__ import annotations

import pytest
from conftest import flip_byte

from ferry.errors import FerryError
from ferry.runtime import Bundle, load
from ferry.runtime.parity import load_golden, verify_against_golden


def test_weights_live_beside_each_graph_and_are_checksummed(demo_variants_bundle):
    manifest = Bundle.open(demo_variants_bundle).manifest
    for graph in ("encoder", "decoder_init", "decoder_step"):
        for precision in ("", ".int8", ".fp16", ".bf16", ".fused"):
            data = demo_variants_bundle / f"{graph}{precision}.onnx.data"
            graph_file = demo_variants_bundle / f"{graph}{precision}.onnx"
            assert data.is_file() and data.stat().st_size > graph_file.stat().st_size
            assert data.name in manifest.files
            assert data.stat().st_mode & 0o444 == 0o444  # readable by the serving user too


def test_the_bundle_loads_and_matches_its_golden_outputs(demo_variants_bundle):
    for precision in ("fp32", "int8", "fp16", "fused"):
        model = load(demo_variants_bundle, precision=precision)
        report = verify_against_golden(model.graphs, load_golden(model.bundle.file("golden")),
                                       special=model.special, backend="onnxruntime",
                                       precision=precision)
        assert report.passed, report.to_dict()


def test_a_damaged_weights_file_is_refused(demo_variants_bundle, tmp_path):
    import shutil

    copy = shutil.copytree(demo_variants_bundle, tmp_path / "bundle")
    flip_byte(copy / "decoder_step.onnx.data")
    with pytest.raises(FerryError, match="decoder_step.onnx.data"):
        Bundle.open(copy)
