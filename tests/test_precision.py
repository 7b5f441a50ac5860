"""Precision variants: int8, fp16 and bf16 graphs next to fp32, measured against the torch
reference, checksummed, selectable as `onnxruntime:<precision>`, and refused when they miss their
tolerance."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import flip_byte

import ferry.runtime
from ferry.cli import main
from ferry.errors import FerryError
from ferry.export import export_bundle
from ferry.runtime import parity
from ferry.runtime.parity import Tolerance, identical_rows


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_variant_agrees_with_fp32_on_the_held_out_set(demo_variants_bundle, demo_run, precision):
    workdir, _, _ = demo_run
    rows = [json.loads(line) for line in (workdir / "data" / "eval.jsonl").read_text()
            .splitlines()]
    fp32 = ferry.runtime.load(demo_variants_bundle, backend="onnxruntime")
    variant_model = ferry.runtime.load(demo_variants_bundle, backend=f"onnxruntime:{precision}")
    ids, mask = fp32.codec.encode([r["source"] for r in rows])
    expected = fp32.generate_ids(ids, mask, max_new_tokens=16)
    got = variant_model.generate_ids(ids, mask, max_new_tokens=16)
    agreement = identical_rows(expected, got, fp32.special.pad) / len(rows)
    assert agreement >= 0.95, agreement
    manifest = json.loads((demo_variants_bundle / "manifest.json").read_text())
    variant = manifest["variants"][precision]
    assert variant["token_agreement"] >= 0.95
    assert set(variant["graphs"]) == {"encoder", "decoder_init", "decoder_step"}
    assert all(np.isfinite(v) for v in variant["max_abs"].values())
    for name in variant["graphs"].values():
        assert name in manifest["files"]
    assert variant_model.backend == f"onnxruntime:{precision}"


@pytest.mark.slow
def test_16_bit_variants_keep_io_fp32_and_stay_within_tolerance(demo_variants_bundle):
    import onnx

    manifest = json.loads((demo_variants_bundle / "manifest.json").read_text())
    for precision, bound in (("fp16", parity.FP16_Q99_ATOL), ("bf16", parity.BF16_Q99_ATOL)):
        variant = manifest["variants"][precision]
        assert max(variant["q99_abs"].values()) <= bound
        assert 0 < max(variant["max_abs"].values()) < 1.0  # rounded, not broken
        model = onnx.load(str(demo_variants_bundle / variant["graphs"]["decoder_step"]))
        onnx.checker.check_model(model)
        assert {v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)
                } <= {onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
        half = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}[precision]
        matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
        weights = [t for t in model.graph.initializer if t.name in matmul_weights]
        assert weights and all(t.data_type == half for t in weights)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.value_info}
        types.update({t.name: t.data_type for t in inferred.initializer})
        norms = [n for n in inferred.node if n.op_type in ("LayerNormalization", "Softmax")]
        assert norms and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in norms)
    assert manifest["variants"]["fp16"]["measured_on"] == "onnxruntime CPU"
    assert "emulated" in manifest["variants"]["bf16"]["measured_on"]
    with pytest.raises(FerryError, match="no bf16 kernels.*onnxruntime-cuda:bf16"):
        ferry.runtime.load(demo_variants_bundle, backend="onnxruntime:bf16")
    for precision in ("fp16", "bf16"):
        checked = CliRunner().invoke(main, ["export", "tensorrt", str(demo_variants_bundle),
                                            "--check", "--precision", precision])
        assert checked.exit_code == 0 and "TensorRT check PASS" in checked.output


@pytest.mark.slow
def test_cli_verifies_compares_and_benches_the_variant(demo_variants_bundle, tmp_path):
    runner = CliRunner()
    verified = runner.invoke(main, ["verify", str(demo_variants_bundle), "--precision", "int8",
                                    "--json"])
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.output)
    assert report["passed"] and report["atol"] is None and report["min_token_agreement"] == 0.95
    chart = tmp_path / "errors.png"
    compared = runner.invoke(main, ["compare", str(demo_variants_bundle), "--json",
                                    "--plot", str(chart)])
    assert compared.exit_code == 0, compared.output
    result = json.loads(compared.stdout)
    reports = {r["candidate"]: r for r in result["reports"]}
    assert list(reports) == ["onnxruntime:fp32", "onnxruntime:int8", "onnxruntime:fp16",
                             "onnxruntime:fused"]
    assert reports["onnxruntime:fp32"]["atol"] == 1e-4
    assert reports["onnxruntime:int8"]["atol"] is None
    assert reports["onnxruntime:fp16"]["q99_atol"] == parity.FP16_Q99_ATOL
    assert "no bf16 kernels" in result["skipped"]["onnxruntime:bf16"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_modified_variant_file_is_refused_by_name(demo_variants_bundle, tmp_path):
    import shutil

    copy = shutil.copytree(demo_variants_bundle, tmp_path / "bundle")
    flip_byte(copy / "decoder_step.int8.onnx")
    with pytest.raises(FerryError, match="decoder_step.int8.onnx"):
        ferry.runtime.Bundle.open(copy)


def test_missing_variant_and_torch_precision_are_clear_errors(tiny_bundle):
    with pytest.raises(FerryError, match="no int8 variant"):
        ferry.runtime.load(tiny_bundle, backend="onnxruntime", precision="int8")
    with pytest.raises(FerryError, match="fp32 reference"):
        ferry.runtime.load(tiny_bundle, backend="torch", precision="int8")
    result = CliRunner().invoke(main, ["verify", str(tiny_bundle), "--backend",
                                       "onnxruntime:int8"])
    assert result.exit_code == 2 and "no int8 variant" in result.output


def test_unknown_precision_is_refused_before_any_work(tiny_run, tmp_path):
    with pytest.raises(FerryError, match="unknown precision 'int3'"):
        export_bundle(tiny_run.checkpoint, tmp_path / "b", precisions=("fp32", "int3"),
                      log=lambda message: None)
    assert not (tmp_path / "b").exists()


def test_a_variant_that_misses_its_tolerance_fails_its_check(bundle_copy, monkeypatch):
    # (a failing export installs nothing: tests/test_export.py checks that for every failure)
    from ferry.export.bundle_writer import _write_variant
    from ferry.export.precision import GraphSource

    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    # fp16 rewrites the fp32 ONNX graph: it needs no model
    sources = {name: GraphSource(bundle_copy / manifest["roles"][name], None, spec, 18)
               for name, spec in ferry.runtime.Bundle.open(bundle_copy).graphs.items()}
    monkeypatch.setitem(parity.TOLERANCES, "fp16", Tolerance(
        atol=None, min_token_agreement=0.95, q99_atol=1e-9))
    with pytest.raises(FerryError, match=r"fp16 variant fails its check: .*99th percentile"):
        _write_variant(bundle_copy, "fp16", sources, manifest["special_ids"],
                       log=lambda message: None)
    monkeypatch.setitem(parity.TOLERANCES, "fp16", Tolerance(atol=None,
                                                            min_token_agreement=1.01))
    with pytest.raises(FerryError, match="greedy tokens agree on 100% .*needed 101%"):
        _write_variant(bundle_copy, "fp16", sources, manifest["special_ids"],
                       log=lambda message: None)


def test_a_variant_missing_its_check_is_made_again_its_fallback_way(bundle_copy, monkeypatch):
    """int4 tries blocks of 128 first and falls back to 32 when its tokens miss the gate: the
    same chain, driven by a first recipe that zeroes the largest weight (tokens must change)."""
    import onnx
    from onnx import numpy_helper

    from ferry.export import bundle_writer, precision
    from ferry.export.precision import GraphSource
    from ferry.runtime.backends.onnxruntime import onnxruntime_graph, session_options

    def zeroing(source: GraphSource, target) -> None:
        model = onnx.load(str(source.onnx))
        largest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        largest.CopyFrom(numpy_helper.from_array(
            np.zeros_like(numpy_helper.to_array(largest)), largest.name))
        onnx.save(model, str(target))

    real = precision.VARIANTS["fp16"]
    chain = precision.Variant("fp16", zeroing, settings="zeroed",
                              fallback=precision.Variant("fp16", real.make, settings="as is"))
    monkeypatch.setattr(bundle_writer, "variant", lambda name: chain)
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    sources = {name: GraphSource(bundle_copy / manifest["roles"][name], None, spec, 18)
               for name, spec in ferry.runtime.Bundle.open(bundle_copy).graphs.items()}
    logged: list[str] = []
    made = bundle_writer._write_variant(bundle_copy, "fp16", sources, manifest["special_ids"],
                                        log=logged.append)
    assert made.settings == "as is" and made.token_agreement >= 0.95
    assert any("fp16 with zeroed misses its check" in line and "making it with as is" in line
               for line in logged), logged
    # the graphs written last are the fallback's: they agree with fp32 on the golden set
    graphs = {name: onnxruntime_graph(spec, real.cpu_session(bundle_copy / made.graphs[name],
                                                             session_options()))
        for name, spec in ferry.runtime.Bundle.open(bundle_copy).graphs.items()}
    report = parity.verify_against_golden(
        graphs, parity.load_golden(bundle_copy / "golden.npz"), backend="fp16",
        precision="fp16", special=ferry.runtime.SpecialIds.from_ids(manifest["special_ids"]))
    assert report.passed, report
    # with no fallback left, the miss is final and says why
    monkeypatch.setattr(bundle_writer, "variant", lambda name: precision.Variant(
        "fp16", zeroing, settings="zeroed"))
    with pytest.raises(FerryError, match="fp16 variant fails its check: .*greedy tokens agree"):
        bundle_writer._write_variant(bundle_copy, "fp16", sources, manifest["special_ids"],
                                     log=lambda message: None)
