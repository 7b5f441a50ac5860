"""`ferry compare --bisect`: probes named at export, marked on demand, and a fault injected into
one layer of one graph found at exactly that layer."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from ferry.cli import main
from ferry.errors import FerryError
from ferry.export.tensorrt_build import build_engines
from ferry.files import sha256_file
from ferry.graph_spec import is_attention_map, is_probe
from ferry.model import Transformer, preset
from ferry.model.graphs import GRAPH_MODULES, graph_specs
from ferry.model.probes import ProbedGraph
from ferry.runtime import Bundle
from ferry.runtime.bisect import bisect, graph_probes

EXIT_CHECK_FAILED = 1


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rehash(bundle, *names: str) -> None:
    """Record the new checksums of `names` in the bundle's manifest."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name in names:
        manifest["files"][name] = sha256_file(bundle / name)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def perturb(graph_file, initializer: str, seed: int = 0) -> None:
    """Add N(0, 0.1²) noise to one initializer of an ONNX graph, in place."""
    model = onnx.load(str(graph_file))
    for tensor in model.graph.initializer:
        if tensor.name == initializer:
            values = numpy_helper.to_array(tensor)
            noise = np.random.default_rng(seed).normal(0, 0.1, values.shape)
            tensor.CopyFrom(numpy_helper.from_array((values + noise).astype(values.dtype),
                                                    initializer))
            break
    else:
        raise AssertionError(f"{graph_file} has no initializer {initializer}")
    onnx.save(model, str(graph_file))


def test_torch_records_every_sublayer_in_order():
    config = preset("tiny", vocab_size=50, dropout=0.0)
    model = Transformer(config).eval()
    names: list[str] = []
    step = ProbedGraph(GRAPH_MODULES["decoder_init"](model), traced_names=names)
    ids = torch.randint(5, 50, (2, 4))
    memory = model.encode(ids, torch.ones_like(ids))
    cross = [t for pair in model.cross_key_values(memory) for t in pair]
    outputs = step(ids, torch.ones_like(ids), *cross)
    expected = ["probe.decoder.embeddings"] + [
        f"probe.decoder.layer_{i}.{part}" for i in range(config.num_decoder_layers)
        for part in ("self_attention", "cross_attention", "ffn")]
    assert [n for n in names if is_probe(n)][: len(expected)] == expected
    assert all(is_probe(n) or is_attention_map(n) for n in names)
    assert names.index("attention.decoder.layer_0.self_attention") < names.index(
        "probe.decoder.layer_0.self_attention")  # the softmax comes before its residual
    assert len(outputs) == len(graph_specs(config)["decoder_init"].outputs) + len(names)
    shapes = {name: tuple(o.shape) for name, o in zip(names, outputs[-len(names):])}
    assert shapes["probe.decoder.layer_0.ffn"] == (2, 4, config.d_model)
    assert shapes["attention.decoder.layer_0.self_attention"] == (2, config.num_heads, 4, 4)
    one = names.index("probe.decoder.layer_0.ffn")
    chosen = ProbedGraph(GRAPH_MODULES["decoder_init"](model), [names[one]])(
        ids, torch.ones_like(ids), *cross)
    assert torch.allclose(chosen[-1], outputs[-len(names) + one], atol=1e-5)  # SDPA: no maps


def test_exported_graphs_name_their_probes_without_outputting_them(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    for graph, spec in bundle.graphs.items():
        model = onnx.load(str(bundle.graph_file(graph)), load_external_data=False)
        assert [o.name for o in model.graph.output] == spec.output_names
        probes = graph_probes(bundle.graph_file(graph))
        stack = "encoder" if graph == "encoder" else "decoder"
        assert probes[0] == f"probe.{stack}.embeddings" and len(probes) > 3, (graph, probes)


def test_bisect_finds_the_one_faulty_layer_of_one_graph(bundle_copy, tmp_path):
    perturb(bundle_copy / "decoder_step.onnx", "model.decoder.layers.1.ffn.down.bias")
    rehash(bundle_copy, "decoder_step.onnx")
    plot = tmp_path / "growth.png"
    result = invoke("compare", bundle_copy, "--bisect", "--backends", "torch,onnxruntime:fp32",
                    "--json", "--plot", plot)
    assert result.exit_code == EXIT_CHECK_FAILED, result.output
    report = json.loads(result.stdout)
    assert report["first"] == {"graph": "decoder_step", "probe": "probe.decoder.layer_1.ffn"}
    layers = report["layers"]
    step = [d for d in layers if d["graph"] == "decoder_step" and is_probe(d["name"])]
    faulty = [d["name"] for d in step].index("probe.decoder.layer_1.ffn")
    assert not any(d["exceeds"] for d in step[:faulty])  # everything before it agrees
    assert all(d["exceeds"] for d in step[faulty:faulty + 3])  # and what follows does not
    assert not any(d["exceeds"] for d in layers if d["graph"] != "decoder_step")
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"

    table = invoke("compare", bundle_copy, "--bisect", "--backends", "torch,onnxruntime:fp32")
    assert "first divergence: graph decoder_step, decoder.layer_1.ffn" in table.stdout


@pytest.mark.parametrize("precision", ["fp32", "fused", "int8", "fp16"])
def test_every_variant_bisects_clean_against_torch(demo_variants_bundle, precision, tmp_path):
    """The trained demo's variants (weights in side files) agree with torch at every probe
    within their tolerance; the fused graphs' SkipLayerNormalization hides some probes, which
    the report names."""
    result = bisect(Bundle.open(demo_variants_bundle), "torch", f"onnxruntime:{precision}",
                    workdir=tmp_path)
    assert result.passed and result.first is None, result.format_table()
    probed = {d.graph for d in result.diffs if is_probe(d.name)}
    assert probed == {"encoder", "decoder_init", "decoder_step"}
    assert bool(result.unprobed) == (precision in ("fused", "int8"))  # int8 quantises fused


def test_bisect_decoder_only_and_encoder_only_bundles(modern_bundle, task_bundles, tmp_path):
    llama = bisect(Bundle.open(modern_bundle("llama")), "torch", "onnxruntime:fp32",
                   workdir=tmp_path / "llama")
    assert llama.passed, llama.format_table()
    assert {d.graph for d in llama.diffs if is_probe(d.name)} == {"decoder_init", "decoder_step"}
    assert any(d.name == "probe.decoder.final_norm" for d in llama.diffs)  # pre-norm
    tagger = bisect(Bundle.open(task_bundles["tag"]), "torch", "onnxruntime",
                    workdir=tmp_path / "tag")
    assert tagger.passed, tagger.format_table()
    assert [d.name for d in tagger.diffs if is_probe(d.name)][:2] == [
        "probe.encoder.embeddings", "probe.encoder.layer_0.attention"]


def test_bisect_refuses_bad_requests_in_one_line(bundle_copy):
    three = invoke("compare", bundle_copy, "--bisect", "--backends",
                   "torch,onnxruntime,onnxruntime:int8")
    assert three.exit_code == 2 and "two different backends" in three.output
    unknown = invoke("compare", bundle_copy, "--bisect", "--precision", "int3")
    assert unknown.exit_code == 2 and "int3" in unknown.output
    plain = invoke("compare", bundle_copy, "--precision", "int8")
    assert plain.exit_code == 2 and "--bisect" in plain.output
    for graph in ("encoder", "decoder_init", "decoder_step"):  # a bundle from before probes
        path = bundle_copy / f"{graph}.onnx"
        path.write_bytes(path.read_bytes().replace(b"probe.", b"value."))
    rehash(bundle_copy, "encoder.onnx", "decoder_init.onnx", "decoder_step.onnx")
    old = invoke("compare", bundle_copy, "--bisect")
    assert old.exit_code == 2 and "re-export the bundle" in old.output


def test_bisect_runs_tensorrt_on_engines_of_the_marked_graphs(bundle_copy, monkeypatch,
                                                               tmp_path):
    """Through the TensorRT stand-in (the documented API, engines run by onnxruntime): the
    engines are built from the probed graphs in the scratch directory, not the bundle's."""
    from fake_tensorrt import BUILDS, install

    install(monkeypatch)
    with pytest.raises(FerryError, match="build_engines"):
        bisect(Bundle.open(bundle_copy), "torch", "tensorrt", workdir=tmp_path / "no")
    result = bisect(Bundle.open(bundle_copy), "torch", "tensorrt", workdir=tmp_path,
                    build_engines=build_engines)
    assert result.passed, result.format_table()
    assert {d.graph for d in result.diffs if is_probe(d.name)} == {
        "encoder", "decoder_init", "decoder_step"}
    assert [b["onnx"] for b in BUILDS[-3:]] == [
        str(tmp_path / f"{graph}.onnx")
        for graph in ("encoder", "decoder_init", "decoder_step")]
    assert not (bundle_copy / "tensorrt").exists()
