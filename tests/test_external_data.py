"""Graphs over protobuf's 2 GB limit keep their weights in a side file; every bundle's graphs now
share one (`weights.onnx.data`, `ferry.export.shared_weights`): exported, validated,
checksummed, loaded and verified like any other bundle. The threshold is lowered here so a tiny
model takes the same path a > 2 GB one does (the per-graph side files, folded into the shared
one)."""

from __future__ import annotations

import onnx
import pytest
from conftest import flip_byte
from onnx.external_data_helper import uses_external_data

from ferry.errors import FerryError
from ferry.runtime import Bundle, load
from ferry.runtime.onnx_scan import external_data_locations
from ferry.runtime.parity import load_golden, verify_against_golden


def test_every_graph_reads_the_one_checksummed_weights_file(demo_variants_bundle):
    manifest = Bundle.open(demo_variants_bundle).manifest
    data = demo_variants_bundle / "weights.onnx.data"
    assert data.name in manifest.files and data.stat().st_mode & 0o444 == 0o444
    for graph in ("encoder", "decoder_init", "decoder_step"):
        for precision in ("", ".int8", ".fp16", ".bf16", ".fused"):
            graph_file = demo_variants_bundle / f"{graph}{precision}.onnx"
            assert external_data_locations(graph_file) == {data.name}
            assert not (demo_variants_bundle / f"{graph}{precision}.onnx.data").exists()
            assert graph_file.stat().st_size < data.stat().st_size / 10


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
    flip_byte(copy / "weights.onnx.data")
    with pytest.raises(FerryError, match="weights.onnx.data"):
        Bundle.open(copy)


def shared_tensors(graph_file) -> dict[tuple[int, int], str]:
    """(offset, length) → initializer name of every tensor a graph reads from the shared file."""
    model = onnx.load(str(graph_file), load_external_data=False)
    return {(int(info["offset"]), int(info["length"])): tensor.name
            for tensor in model.graph.initializer if uses_external_data(tensor)
            for info in [{e.key: e.value for e in tensor.external_data}]}


def test_the_decoder_graphs_and_variants_hold_one_copy_of_each_weight(tiny_bundle):
    """decoder_init and decoder_step read the same bytes; the tied embedding is stored once for
    the encoder and the decoder; the file holds each tensor once."""
    init, step, encoder = (shared_tensors(tiny_bundle / f"{graph}.onnx")
                           for graph in ("decoder_init", "decoder_step", "encoder"))
    assert set(init) == set(step) and len(init) > 10  # the same bytes, whatever their names
    embedding = [key for key, name in encoder.items() if name == "model.embedding.tokens.weight"]
    assert embedding and embedding[0] in init
    decoder_bytes = sum(length for _, length in init)
    stored = (tiny_bundle / "weights.onnx.data").stat().st_size
    held = sum(length for graph in (encoder, init, step) for _, length in graph)
    assert stored < held - decoder_bytes + 4096 * (len({**encoder, **init}) + 1)  # pages of padding
    offsets = sorted({**encoder, **init, **step})
    assert all(a + n <= b for (a, n), (b, _) in zip(offsets, offsets[1:]))  # no overlap
    assert all(offset % 4096 == 0 for offset, _ in offsets)
