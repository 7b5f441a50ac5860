"""Export: the ONNX graphs and manifest of a bundle, ONNX Runtime vs torch parity, and the
exporter's refusals (bad destination, bad checkpoint) and clean replacement of a bundle."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import ferry
import ferry.runtime
from ferry.errors import FerryError
from ferry.export import export_bundle
from ferry.graph_spec import GraphSpec
from ferry.model.config import TransformerConfig
from ferry.model.graphs import graph_specs
from ferry.runtime.bundle import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE
from ferry.runtime.parity import FeedSizes, compare_graphs, graph_feeds

GRAPH_NAMES = ["encoder", "decoder_init", "decoder_step"]
DYNAMIC_DIMS = {"batch", "src_len", "tgt_len", "past_len", "total_len"}
ATOL = 1e-4
QUIET = {"log": lambda message: None}


def read_manifest(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_FILE).read_text(encoding="utf-8"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path → content)."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def all_op_types(model: onnx.ModelProto) -> set[str]:
    """Op types in the main graph, in nested subgraphs and in local functions."""
    ops: set[str] = set()

    def walk(nodes) -> None:
        for node in nodes:
            ops.add(node.op_type)
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    walk(attribute.g.node)
                for graph in attribute.graphs:
                    walk(graph.node)

    walk(model.graph.node)
    for function in model.functions:
        walk(function.node)
    return ops


def shape_of(value_info: onnx.ValueInfoProto) -> list[onnx.TensorShapeProto.Dimension]:
    return list(value_info.type.tensor_type.shape.dim)


# ---------------------------------------------------------------- the ONNX graphs


@pytest.fixture(scope="module")
def manifest(tiny_bundle) -> dict:
    return read_manifest(tiny_bundle)


@pytest.fixture(scope="module")
def onnx_models(tiny_bundle) -> dict[str, onnx.ModelProto]:
    return {name: onnx.load(str(tiny_bundle / f"{name}.onnx")) for name in GRAPH_NAMES}


def test_bundle_holds_the_three_graphs(tiny_bundle, manifest):
    assert sorted(manifest["graphs"]) == sorted(GRAPH_NAMES)
    for name in GRAPH_NAMES:
        assert manifest["roles"][name] == f"{name}.onnx"
        assert (tiny_bundle / f"{name}.onnx").is_file()


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graph_opset_is_at_least_17(name, onnx_models, manifest):
    default = [o.version for o in onnx_models[name].opset_import if o.domain in ("", "ai.onnx")]
    assert len(default) == 1, onnx_models[name].opset_import
    assert default[0] >= 17
    assert default[0] == manifest["opset"]


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graph_has_no_control_flow(name, onnx_models):
    ops = all_op_types(onnx_models[name])
    assert ops, "graph has no nodes"
    assert not ops & {"If", "Loop", "Scan"}


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graph_passes_onnx_checker(name, tiny_bundle):
    onnx.checker.check_model(str(tiny_bundle / f"{name}.onnx"), full_check=True)


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graph_io_names_match_manifest_spec(name, onnx_models, manifest):
    spec = GraphSpec.from_dict(manifest["graphs"][name])
    graph = onnx_models[name].graph
    assert [i.name for i in graph.input] == spec.input_names
    assert [o.name for o in graph.output] == spec.output_names


@pytest.mark.parametrize("name", GRAPH_NAMES)
def test_graph_dims_are_named_as_in_spec(name, onnx_models, manifest):
    spec = GraphSpec.from_dict(manifest["graphs"][name])
    graph = onnx_models[name].graph
    input_params: set[str] = set()
    for tensors, infos in ((spec.inputs, graph.input), (spec.outputs, graph.output)):
        for tensor, info in zip(tensors, infos):
            dims = shape_of(info)
            assert len(dims) == len(tensor.shape), (name, tensor.name)
            for declared, dim in zip(tensor.shape, dims):
                where = f"{name}/{tensor.name}"
                if isinstance(declared, int):
                    assert dim.HasField("dim_value") and dim.dim_value == declared, where
                else:  # symbolic, named exactly as declared (total_len for a derived dim)
                    assert dim.HasField("dim_param") and dim.dim_param == declared, where
                if tensors is spec.inputs and dim.HasField("dim_param"):
                    input_params.add(dim.dim_param)
    assert input_params == set(spec.dims)
    assert input_params <= DYNAMIC_DIMS


def test_graph_dynamic_dims_cover_all_names(manifest):
    used = set()
    for name in GRAPH_NAMES:
        used |= set(manifest["graphs"][name]["dims"])
    assert used == DYNAMIC_DIMS


# ---------------------------------------------------------------- manifest and files


def test_manifest_identity_and_model(manifest, tiny_run):
    checkpoint_config = json.loads((tiny_run.checkpoint / "config.json").read_text())
    assert manifest["format"] == FORMAT_NAME == "ferry-bundle"
    assert manifest["format_version"] == FORMAT_VERSION
    assert isinstance(manifest["format_version"], int)
    assert manifest["model"] == checkpoint_config["model"]
    assert manifest["special_ids"] == checkpoint_config["special_ids"]
    assert {"pad", "bos", "eos"} <= set(manifest["special_ids"])


def test_manifest_graph_specs_are_the_models(manifest):
    expected = graph_specs(TransformerConfig.from_dict(manifest["model"]))
    assert manifest["graphs"] == {name: spec.to_dict() for name, spec in expected.items()}


def test_manifest_producer_versions(manifest):
    producer = manifest["producer"]
    assert producer["ferry"] == ferry.__version__
    assert producer["torch"] == torch.__version__
    assert producer["onnx"] == onnx.__version__


def test_manifest_checksums_cover_every_other_file(tiny_bundle, manifest):
    on_disk = sorted(p.name for p in tiny_bundle.iterdir() if p.name != MANIFEST_FILE)
    assert all((tiny_bundle / n).is_file() for n in on_disk)
    assert sorted(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert digest == sha256(tiny_bundle / name), name
    assert set(manifest["roles"].values()) <= set(manifest["files"])


def test_golden_loads_without_pickle(tiny_bundle, manifest):
    with np.load(tiny_bundle / "golden.npz", allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    assert all(a.dtype != object for a in arrays.values())
    for name in GRAPH_NAMES:
        spec = GraphSpec.from_dict(manifest["graphs"][name])
        for tensor in spec.inputs:
            assert arrays[f"{name}/in/{tensor.name}"].dtype == np.dtype(tensor.dtype)
        for tensor in spec.outputs:
            assert arrays[f"{name}/out/{tensor.name}"].dtype == np.dtype(tensor.dtype)
    for key in ("input_ids", "attention_mask", "output_ids"):
        assert arrays[f"generation/{key}"].dtype == np.int64
    assert len(arrays["generation/output_ids"]) == len(arrays["generation/input_ids"]) > 0


# ---------------------------------------------------------------- parity


@pytest.fixture(scope="module")
def torch_model(tiny_bundle):
    return ferry.runtime.load(tiny_bundle, backend="torch")


@pytest.fixture(scope="module")
def ort_model(tiny_bundle):
    return ferry.runtime.load(tiny_bundle, backend="onnxruntime")


@pytest.mark.parametrize("sizes, seed", [
    (FeedSizes(batch=3, src_len=23, tgt_len=3, past_len=12), 11),
    (FeedSizes(batch=6, src_len=2, tgt_len=1, past_len=1), 12),
], ids=["b3-s23-t3-p12", "b6-s2-t1-p1"])
def test_onnxruntime_matches_torch_on_padded_inputs(sizes, seed, torch_model, ort_model,
                                                     manifest):
    feeds = graph_feeds(torch_model.graphs, sizes=sizes, vocab_size=manifest["model"]["vocab_size"],
                        pad=manifest["special_ids"]["pad"], seed=seed)
    mask = feeds["encoder"]["attention_mask"]
    assert mask.shape == (sizes.batch, sizes.src_len)
    if sizes.src_len > 2:
        assert (mask.sum(axis=1) < sizes.src_len).any(), "the batch should contain padded rows"
    diffs = compare_graphs(torch_model.graphs, ort_model.graphs, feeds, ATOL)
    compared = {(d.graph, d.output) for d in diffs}
    for name in GRAPH_NAMES:
        spec = GraphSpec.from_dict(manifest["graphs"][name])
        assert {(name, output) for output in spec.output_names} <= compared
    failed = [d for d in diffs if not (d.passed and d.max_abs <= ATOL)]
    assert not failed, failed
    # the candidate's outputs have the reference's shapes (checked by compare_graphs) and are
    # finite; spot-check the logits shape of the step graph explicitly
    step = ort_model.graphs["decoder_step"].infer(feeds["decoder_step"])
    assert step["logits"].shape == (sizes.batch, 1, manifest["model"]["vocab_size"])
    assert step["present_key_0"].shape[2] == sizes.past_len + 1


def test_greedy_tokens_identical_on_eval_split(date_data, torch_model, ort_model):
    rows = [json.loads(line) for line in
            (date_data / "eval.jsonl").read_text(encoding="utf-8").splitlines() if line]
    assert len(rows) >= 100
    input_ids, mask = torch_model.codec.encode([row["source"] for row in rows])
    expected = torch_model.generate_ids(input_ids, mask)
    got = ort_model.generate_ids(input_ids, mask)
    assert expected.shape[0] == len(rows) and expected.shape[1] > 0
    assert got.shape == expected.shape
    mismatched = [i for i in range(len(rows)) if not np.array_equal(expected[i], got[i])]
    assert not mismatched, f"{len(mismatched)} rows differ, e.g. row {mismatched[:5]}"


# ---------------------------------------------------------------- refusals and replacement


def no_staging_left(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "staging" in p.name or ".old-" in p.name]


def test_export_refuses_non_bundle_nonempty_out(tiny_run, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("do not touch\n")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    before = snapshot(out)
    with pytest.raises(FerryError) as excinfo:
        export_bundle(tiny_run.checkpoint, out, **QUIET)
    assert str(out) in str(excinfo.value)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_export_refuses_file_as_out(tiny_run, tmp_path):
    out = tmp_path / "bundle"
    out.write_text("a file\n")
    with pytest.raises(FerryError):
        export_bundle(tiny_run.checkpoint, out, **QUIET)
    assert out.read_text() == "a file\n"


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "plain_file", "other_dir", "bundle"])
def test_export_refuses_non_checkpoint(kind, tiny_bundle, tmp_path):
    source = tmp_path / "source"
    if kind == "empty_dir":
        source.mkdir()
    elif kind == "plain_file":
        source.write_text("not a checkpoint\n")
    elif kind == "other_dir":
        source.mkdir()
        (source / "model.safetensors").write_bytes(b"junk")
    elif kind == "bundle":
        source = Path(shutil.copytree(tiny_bundle, source))
    out = tmp_path / "out" / "bundle"
    with pytest.raises(FerryError) as excinfo:
        export_bundle(source, out, **QUIET)
    assert str(source) in str(excinfo.value)
    assert not out.exists()
    if out.parent.exists():
        assert list(out.parent.iterdir()) == []


def test_export_refuses_checkpoint_without_tokenizer(tiny_run, tmp_path):
    checkpoint = Path(shutil.copytree(tiny_run.checkpoint, tmp_path / "checkpoint"))
    (checkpoint / "tokenizer.json").unlink()
    out = tmp_path / "out"
    with pytest.raises(FerryError, match="tokenizer"):
        export_bundle(checkpoint, out, **QUIET)
    assert not out.exists()
    assert no_staging_left(tmp_path) == []


def test_failed_export_keeps_existing_bundle(tiny_run, bundle_copy):
    before = snapshot(bundle_copy)
    with pytest.raises(FerryError, match="opset"):
        export_bundle(tiny_run.checkpoint, bundle_copy, opset=16, **QUIET)
    assert snapshot(bundle_copy) == before
    assert no_staging_left(bundle_copy.parent) == []
    ferry.runtime.Bundle.open(bundle_copy)


def test_reexport_replaces_bundle_cleanly(tiny_run, bundle_copy):
    parent = bundle_copy.parent
    siblings = sorted(p.name for p in parent.iterdir())
    (bundle_copy / "stale.txt").write_text("from the old bundle\n")
    result = export_bundle(tiny_run.checkpoint, bundle_copy, **QUIET)
    assert Path(result) == bundle_copy
    assert sorted(p.name for p in parent.iterdir()) == siblings
    assert no_staging_left(parent) == []
    assert not (bundle_copy / "stale.txt").exists()
    manifest = read_manifest(bundle_copy)
    assert sorted(p.name for p in bundle_copy.iterdir() if p.name != MANIFEST_FILE) == sorted(
        manifest["files"])
    opened = ferry.runtime.Bundle.open(bundle_copy)
    assert set(opened.graphs) == set(GRAPH_NAMES)
    outputs = ferry.runtime.load(opened, backend="onnxruntime").generate(["March 5, 2021"])
    assert len(outputs) == 1 and isinstance(outputs[0], str)
