"""Graphs over protobuf's 2 GB limit keep their weights in a side file (`<graph>.onnx.data`):
exported, validated, checksummed, loaded and verified like any other bundle. The threshold is
lowered here so a tiny model takes the same path a > 2 GB one does."""

from __future__ import annotations

import pytest
from conftest import flip_byte

import ferry.export.onnx_export as onnx_export
from ferry.errors import FerryError
from ferry.export import export_bundle
from ferry.runtime import Bundle, load
from ferry.runtime.parity import load_golden, verify_against_golden


@pytest.fixture(scope="module")
def external_bundle(demo_run, tmp_path_factory):
    """The demo's trained model (int8 needs a trained model to meet its gate), exported with
    every graph's weights in a side file."""
    patch = pytest.MonkeyPatch()
    patch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    try:
        out = tmp_path_factory.mktemp("external") / "bundle"
        return export_bundle(demo_run[0] / "run" / "best", out, precisions=("fp32", "int8"),
                             log=lambda m: None)
    finally:
        patch.undo()


def test_weights_live_beside_each_graph_and_are_checksummed(external_bundle):
    manifest = Bundle.open(external_bundle).manifest
    for graph in ("encoder", "decoder_init", "decoder_step"):
        data = external_bundle / f"{graph}.onnx.data"
        assert data.is_file() and data.stat().st_size > (external_bundle / f"{graph}.onnx"
                                                          ).stat().st_size
        assert data.name in manifest["files"]


def test_the_bundle_loads_and_matches_its_golden_outputs(external_bundle):
    for precision in ("fp32", "int8"):
        model = load(external_bundle, precision=precision)
        report = verify_against_golden(model.graphs, load_golden(model.bundle.file("golden")),
                                       special=model.special, backend="onnxruntime",
                                       precision=precision)
        assert report.passed, report.to_dict()


def test_a_damaged_weights_file_is_refused(external_bundle, tmp_path):
    import shutil

    copy = shutil.copytree(external_bundle, tmp_path / "bundle")
    flip_byte(copy / "decoder_step.onnx.data")
    with pytest.raises(FerryError, match="decoder_step.onnx.data"):
        Bundle.open(copy)
