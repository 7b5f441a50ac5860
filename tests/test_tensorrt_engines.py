"""TensorRT engines without TensorRT: sidecar matching, the builder's calls and the `tensorrt`
backend's whole inference path, run against a strict stand-in of the documented TensorRT and
cuda-python APIs (`fake_tensorrt`); plus the real thing where TensorRT is installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from conftest import flip_byte

import ferry.runtime
from ferry.cli import main
from ferry.errors import FerryError
from ferry.export.tensorrt_build import build_engines
from ferry.runtime import Bundle
from ferry.runtime.engine_sidecar import EngineSidecar, Platform, engine_paths, mismatch

H200 = Platform(tensorrt_version="10.99.0", gpu_name="Fake H200", compute_capability="9.0")


def _sidecar(**changes) -> EngineSidecar:
    sidecar = EngineSidecar(graph="encoder", precision="fp16", platform=H200,
                            onnx_file="encoder.fp16.onnx", onnx_sha256="a" * 64,
                            plan_sha256="b" * 64, profiles={}, workspace_bytes=1 << 30,
                            build_seconds=1.0)
    return dataclasses.replace(sidecar, **changes)


def test_sidecar_matching_rules():
    assert mismatch(_sidecar(), H200, "a" * 64) is None
    other_card = dataclasses.replace(H200, gpu_name="Fake GH200")
    assert mismatch(_sidecar(), other_card, "a" * 64) is None  # same compute capability
    newer = dataclasses.replace(H200, tensorrt_version="11.0.0")
    assert "TensorRT 10.99.0, installed is 11.0.0" in mismatch(_sidecar(), newer, "a" * 64)
    ada = dataclasses.replace(H200, gpu_name="L4", compute_capability="8.9")
    assert "compute capability 9.0" in mismatch(_sidecar(), ada, "a" * 64)
    assert "re-exported" in mismatch(_sidecar(), H200, "c" * 64)
    assert "format" in mismatch(_sidecar(format=0), H200, "a" * 64)


def test_a_sidecar_round_trips_and_a_broken_one_is_a_clear_error(tmp_path):
    path = tmp_path / "encoder.fp16.json"
    _sidecar().write(path)
    assert EngineSidecar.read(path) == _sidecar()
    path.write_text("{not json")
    with pytest.raises(FerryError, match="malformed.*ferry export tensorrt"):
        EngineSidecar.read(path)
    with pytest.raises(FerryError, match="missing"):
        EngineSidecar.read(tmp_path / "absent.json")


def test_without_tensorrt_the_backend_says_what_to_install(tiny_bundle):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    with pytest.raises(FerryError, match="pip install tensorrt cuda-python"):
        ferry.runtime.load(tiny_bundle, backend="tensorrt")


def test_builder_uses_strong_typing_spec_profiles_and_the_timing_cache(bundle_copy,
                                                                        monkeypatch):
    from fake_tensorrt import BUILDS, install

    install(monkeypatch)
    bundle = Bundle.open(bundle_copy)
    logs: list[str] = []
    built = build_engines(bundle, workspace_gib=2, log=logs.append)
    assert [b.status for b in built] == ["built"] * 3
    assert len(BUILDS) == 3 and all(b["flags"] == 1 << 5 for b in BUILDS)  # STRONGLY_TYPED
    assert all(b["workspace"] == 2 << 30 for b in BUILDS)
    specs = bundle.graphs
    for build, name in zip(BUILDS, specs):
        profile = specs[name].profile_shapes(dynamic_only=True)
        expected = {k: [list(s) for s in v] for k, v in profile.items()}
        assert build["profiles"] == [expected]
        assert build["onnx"].endswith(f"{name}.onnx")
    # each build starts from the cache the previous one saved
    assert [b["timing_cache_in"] for b in BUILDS] == ["", "+", "++"]
    assert (bundle_copy / "tensorrt" / "timing.cache").read_bytes() == b"+++"
    sidecar = EngineSidecar.read(engine_paths(bundle_copy / "tensorrt", "decoder_step",
                                              "fp32")[1])
    assert sidecar.platform == H200
    # the graph's checksum and its shared weights' (a graph file holds only offsets into them)
    assert sidecar.onnx_sha256 == bundle.graph_checksum(bundle.graph_file("decoder_step"))
    assert sidecar.onnx_sha256 != bundle.manifest.files["decoder_step.onnx"]
    assert sidecar.profiles["past_key_0"][2][2] == specs["decoder_step"].dims["past_len"].max
    assert any("Building engine" in line for line in logs)  # progress reached the log

    again = build_engines(bundle, log=logs.append)
    assert [b.status for b in again] == ["up to date"] * 3 and len(BUILDS) == 3
    monkeypatch.setattr("fake_tensorrt.__version__", "11.0.0")
    upgraded = build_engines(bundle, log=logs.append)
    assert all("installed is 11.0.0" in b.status for b in upgraded) and len(BUILDS) == 6
    reweighted = dataclasses.replace(bundle, manifest=dataclasses.replace(
        bundle.manifest, files={**bundle.manifest.files, "weights.onnx.data": "0" * 64}))
    rebuilt = build_engines(reweighted, log=logs.append)  # new weights, same graph files
    assert all(b.status.startswith("rebuilt") for b in rebuilt) and len(BUILDS) == 9


def test_engines_generate_what_onnxruntime_generates(bundle_copy, monkeypatch):
    from fake_tensorrt import ALLOCATIONS, install

    install(monkeypatch)
    build_engines(Bundle.open(bundle_copy), log=lambda message: None)
    sources = ["12 March 1999", "3/4/2021", "the first of May, 1887"]
    with ferry.runtime.load(bundle_copy, backend="tensorrt") as engines:
        reference = ferry.runtime.load(bundle_copy, backend="onnxruntime")
        assert engines.generate(sources, max_new_tokens=12) == reference.generate(
            sources, max_new_tokens=12)
        assert engines.generate(sources[:1], num_beams=3, max_new_tokens=12) == \
            reference.generate(sources[:1], num_beams=3, max_new_tokens=12)
        step = engines.graphs["decoder_step"]
        grown = {name: b.capacity for name, b in step.buffers.items()}
        engines.generate(sources[:1], max_new_tokens=4)  # smaller: no buffer is reallocated
        assert {name: b.capacity for name, b in step.buffers.items()} == grown
    assert not ALLOCATIONS  # closing the model freed every device buffer


def test_verify_and_compare_take_the_tensorrt_backend(bundle_copy, monkeypatch):
    from fake_tensorrt import install

    install(monkeypatch)
    build_engines(Bundle.open(bundle_copy), log=lambda message: None)
    runner = CliRunner()
    verified = runner.invoke(main, ["verify", str(bundle_copy), "--backend", "tensorrt"])
    assert verified.exit_code == 0, verified.output
    compared = runner.invoke(main, ["compare", str(bundle_copy), "--json"])
    report = json.loads(compared.output)
    assert compared.exit_code == 0, compared.output
    assert [r["candidate"] for r in report["reports"]] == ["onnxruntime:fp32", "tensorrt:fp32"]
    assert "onnxruntime-cuda:fp32" in report["skipped"]
    described = runner.invoke(main, ["inspect", str(bundle_copy)])
    assert "engine tensorrt/decoder_step.fp32.plan: TensorRT 10.99.0, Fake H200 (compute " \
        "capability 9.0)" in described.output


def test_stale_or_damaged_engines_are_refused_with_the_rebuild_command(bundle_copy,
                                                                       monkeypatch):
    from fake_tensorrt import install

    install(monkeypatch)
    build_engines(Bundle.open(bundle_copy), log=lambda message: None)
    monkeypatch.setattr("fake_tensorrt.__version__", "11.0.0")
    with pytest.raises(FerryError, match=r"installed is 11\.0\.0.*ferry export tensorrt"):
        ferry.runtime.load(bundle_copy, backend="tensorrt")
    monkeypatch.setattr("fake_tensorrt.__version__", "10.99.0")
    flip_byte(engine_paths(bundle_copy / "tensorrt", "encoder", "fp32")[0])
    with pytest.raises(FerryError, match="encoder.fp32.plan does not match"):
        ferry.runtime.load(bundle_copy, backend="tensorrt")
    with pytest.raises(FerryError, match="no fp16 TensorRT engine"):
        ferry.runtime.load(bundle_copy, backend="tensorrt:fp16")


def test_unbuildable_graphs_fail_before_tensorrt_is_needed(bundle_copy):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    assert manifest["opset"] >= 17
    result = CliRunner().invoke(main, ["export", "tensorrt", str(bundle_copy),
                                       "--precision", "int8"])
    assert result.exit_code == 2
    assert "no int8 variant" in result.output


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_engines_match_onnxruntime(bundle_copy):
    build_engines(Bundle.open(bundle_copy), workspace_gib=2, log=print)
    engines = ferry.runtime.load(bundle_copy, backend="tensorrt")
    reference = ferry.runtime.load(bundle_copy, backend="onnxruntime")
    ids, mask = reference.codec.encode(["12 March 1999", "3/4/2021"])
    assert np.array_equal(engines.generate_ids(ids, mask, max_new_tokens=16),
                          reference.generate_ids(ids, mask, max_new_tokens=16))


def test_onnxruntime_providers_by_short_name_with_clear_errors(tiny_bundle):
    from ferry.runtime.backends.onnxruntime import provider_options, resolve_providers

    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(FerryError, match=r"CUDAExecutionProvider.*available: .*"
                                             r"CPUExecutionProvider.*onnxruntime-gpu"):
            ferry.runtime.load(tiny_bundle, backend="onnxruntime-cuda")
    spec = Bundle.open(tiny_bundle).graphs["decoder_step"]
    options = provider_options("TensorrtExecutionProvider", spec, "/tmp/engines")
    batch, past = spec.dims["batch"], spec.dims["past_len"]
    heads, head_dim = spec.input("past_key_0").shape[1], spec.input("past_key_0").shape[3]
    assert f"past_key_0:{batch.max}x{heads}x{past.max}x{head_dim}" in \
        options["trt_profile_max_shapes"].split(",")
    assert options["trt_engine_cache_path"] == "/tmp/engines"
    assert options["device_id"] == "0"
    assert provider_options("CUDAExecutionProvider", spec, None, device_id=1) == \
        {"device_id": "1"}
    assert provider_options("CPUExecutionProvider", spec, None) == {}
