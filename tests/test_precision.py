"""Precision variants: an int8 bundle next to fp32, measured against the torch reference,
checksummed, selectable as `onnxruntime:int8`, and refused when it misses its tolerance."""

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


@pytest.fixture(scope="module")
def demo_int8_bundle(demo_run, tmp_path_factory):
    """The demo's trained model exported with an int8 variant."""
    workdir, _, _ = demo_run
    out = tmp_path_factory.mktemp("int8") / "bundle"
    return export_bundle(workdir / "run" / "best", out, precisions=("fp32", "int8"),
                         log=lambda message: None)


@pytest.mark.slow
def test_int8_agrees_with_fp32_on_the_held_out_set(demo_int8_bundle, demo_run):
    workdir, _, _ = demo_run
    rows = [json.loads(line) for line in (workdir / "data" / "eval.jsonl").read_text()
            .splitlines()]
    fp32 = ferry.runtime.load(demo_int8_bundle, backend="onnxruntime")
    int8 = ferry.runtime.load(demo_int8_bundle, backend="onnxruntime", precision="int8")
    ids, mask = fp32.codec.encode([r["source"] for r in rows])
    expected = fp32.generate_ids(ids, mask, max_new_tokens=16)
    got = int8.generate_ids(ids, mask, max_new_tokens=16)
    agreement = identical_rows(expected, got, fp32.special.pad) / len(rows)
    assert agreement >= 0.95, agreement
    manifest = json.loads((demo_int8_bundle / "manifest.json").read_text())
    variant = manifest["variants"]["int8"]
    assert variant["token_agreement"] >= 0.95
    assert set(variant["graphs"]) == {"encoder", "decoder_init", "decoder_step"}
    assert all(np.isfinite(v) for v in variant["max_abs"].values())
    for name in variant["graphs"].values():
        assert name in manifest["files"]
    assert int8.backend == "onnxruntime:int8"


@pytest.mark.slow
def test_cli_verifies_compares_and_benches_the_variant(demo_int8_bundle):
    runner = CliRunner()
    verified = runner.invoke(main, ["verify", str(demo_int8_bundle), "--backend",
                                    "onnxruntime:int8", "--json"])
    assert verified.exit_code == 0, verified.output
    report = json.loads(verified.output)
    assert report["passed"] and report["atol"] is None and report["min_token_agreement"] == 0.95
    compared = runner.invoke(main, ["compare", str(demo_int8_bundle), "--backends",
                                    "torch,onnxruntime,onnxruntime:int8", "--json"])
    assert compared.exit_code == 0, compared.output
    reports = json.loads(compared.output)["reports"]
    assert [r["candidate"] for r in reports] == ["onnxruntime", "onnxruntime:int8"]
    assert reports[0]["atol"] == 1e-4 and reports[1]["atol"] is None


@pytest.mark.slow
def test_a_modified_variant_file_is_refused_by_name(demo_int8_bundle, tmp_path):
    import shutil

    copy = shutil.copytree(demo_int8_bundle, tmp_path / "bundle")
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


def test_a_variant_that_misses_its_tolerance_fails_the_export_and_installs_nothing(
        tiny_run, tmp_path, monkeypatch):
    monkeypatch.setitem(parity.TOLERANCES, "int8", Tolerance(atol=None,
                                                            min_token_agreement=1.01))
    with pytest.raises(FerryError, match="int8 variant fails its check"):
        export_bundle(tiny_run.checkpoint, tmp_path / "b", precisions=("fp32", "int8"),
                      log=lambda message: None)
    assert list(tmp_path.iterdir()) == []
