"""Bisection: the first layer where two backends part ways.

Every exported graph names the residual stream between its sublayers (the probes of
`ferry.model.probes`: embeddings, each layer's attention and FFN outputs, the final norm). To
bisect, both backends load a *probed bundle*: a scratch directory holding the bundle's graphs
of their precisions with those values marked as graph outputs, the graph specs extended to
match (the torch reference records the same states with forward hooks), a copy of the weights
the graphs read, and links to every other file. Both run every graph on the bundle's golden
inputs; the states are diffed probe by probe, in the order the graph computes them, and the
first probe whose error exceeds the precision's tolerance is named.

Marking an intermediate value as an output can keep a runtime from fusing across it, as with
Polygraphy's `--onnx-outputs mark all`: the graph outputs are diffed too, so a divergence the
probed run no longer shows is visible as such.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ferry.errors import FerryError
from ferry.files import sha256_file
from ferry.graph_spec import is_probe, with_probes
from ferry.runtime.backends.base import parse_backend
from ferry.runtime.bundle import Bundle
from ferry.runtime.onnx_scan import external_data_locations
from ferry.runtime.parity import (
    FP32_RTOL,
    TensorDiff,
    diff_outputs,
    golden_arrays,
    load_golden,
    tolerance_for,
)

# A bisection holds each hidden state's 99th-percentile |Δ| to this share of the state's largest
# magnitude: quantised graphs, which parity gates by token agreement alone (int8 measured
# ≤ 0.005 on the demo, every layer), and 16-bit graphs where that exceeds their absolute gate
# (the residual stream grows through the layers: 35 at the demo decoder's last, hundreds in
# LLMs, where fp16's rounding alone passes 1e-2).
Q99_SHARE = {"int8": 0.02, "int4": 0.05, "fp16": 1e-3, "bf16": 8e-3}


@dataclass
class ProbeDiff:
    """One probe (or graph output) of one graph: how far the candidate is from the reference."""

    graph: str
    name: str  # a probe (`probe.decoder.layer_1.ffn`) or a graph output (`logits`)
    max_abs: float
    q99_abs: float
    scale: float  # max |reference|
    exceeds: bool

    @property
    def label(self) -> str:
        return self.name.removeprefix("probe.")


@dataclass
class Bisection:
    """The outcome of `bisect`: per graph, its probes in computation order, then its outputs."""

    reference: str
    candidate: str
    precision: str
    criterion: str  # what `exceeds` means, for the table
    diffs: list[ProbeDiff] = field(default_factory=list)
    unprobed: dict[str, list[str]] = field(default_factory=dict)  # graph → probes a side lacks

    @property
    def first(self) -> ProbeDiff | None:
        """The first probe past the tolerance, in graph order (None: every layer agrees)."""
        return next((d for d in self.diffs if d.exceeds and is_probe(d.name)), None)

    @property
    def passed(self) -> bool:
        return not any(d.exceeds for d in self.diffs)

    def to_dict(self) -> dict:
        first = self.first
        return {"reference": self.reference, "candidate": self.candidate,
                "precision": self.precision, "criterion": self.criterion,
                "passed": self.passed,
                "first": {"graph": first.graph, "probe": first.name} if first else None,
                "layers": [asdict(d) for d in self.diffs], "unprobed": self.unprobed}

    def format_table(self) -> str:
        width = max([len(d.label) for d in self.diffs] + [10])
        lines = [f"{self.candidate} vs {self.reference} ({self.criterion})",
                 f"{'graph':<13} {'layer':<{width}} {'max abs':>9} {'p99 abs':>9} "
                 f"{'max |ref|':>9}  ok"]
        for d in self.diffs:
            lines.append(f"{d.graph:<13} {d.label:<{width}} {d.max_abs:>9.2e} {d.q99_abs:>9.2e} "
                         f"{d.scale:>9.2e}  {'NO' if d.exceeds else 'yes'}")
        for graph, names in self.unprobed.items():
            lines.append(f"{graph}: not probed on both sides (fused away in one): "
                         + ", ".join(n.removeprefix("probe.") for n in names))
        first = self.first
        if first is not None:
            lines.append(f"first divergence: graph {first.graph}, {first.label} "
                         f"(max |Δ| {first.max_abs:.2e}, 99th percentile {first.q99_abs:.2e})")
        elif not self.passed:
            outputs = sorted({f"{d.graph}/{d.name}" for d in self.diffs if d.exceeds})
            lines.append(f"every probed layer agrees, but outputs {outputs} do not: the "
                         "divergence is after the last probe (the output projection)")
        else:
            lines.append("every layer agrees within the tolerance")
        return "\n".join(lines)


def graph_probes(path: Path, kind=is_probe) -> list[str]:
    """The probes an ONNX graph names (`kind`: hidden states, or `is_attention_map`), in the
    order its nodes compute them."""
    model = onnx.load(str(path), load_external_data=False)
    return [out for node in model.graph.node for out in node.output if kind(out)]


def mark_probes(source: Path, target: Path, names: list[str]) -> None:
    """Write `source` to `target` with the probe values `names` as extra graph outputs after its
    own (element types from shape inference; weights stay where they were: inline, or the
    external data file beside `target`)."""
    model = onnx.load(str(source), load_external_data=False)
    typed = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
    for name in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(
            name, types.get(name, onnx.TensorProto.FLOAT), None))
    onnx.save(model, str(target))


def _carry(source: Path, target: Path, graph_data: set[str]) -> None:
    """`target` standing for the bundle's file `source`: a copy of the weights a graph reads
    (ONNX Runtime refuses external data that a symlink leads out of the graph's directory, and
    `onnx.checker` refuses one with several hard links), a symlink to anything else."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.name in graph_data:
        shutil.copyfile(source, target)
    else:
        os.symlink(source.resolve(), target)


def probed_bundle(bundle: Bundle, precisions: list[str], probes: dict[str, list[str]],
                  directory: Path) -> Bundle:
    """A bundle in `directory` whose graphs of `precisions` also output `probes` (graph →
    names) and whose specs declare them; the weights they read are copied there once, every
    other file is a symlink to `bundle`'s."""
    directory.mkdir(parents=True, exist_ok=True)
    rewritten, graph_data = {}, set()
    for precision in dict.fromkeys(precisions):
        for graph in bundle.graphs:
            source = bundle.graph_file(graph, precision)
            name = source.relative_to(bundle.path).as_posix()
            mark_probes(source, directory / name, probes[graph])
            rewritten[name] = sha256_file(directory / name)
            graph_data |= external_data_locations(source)
    for name in bundle.manifest.files:
        if name not in rewritten:
            _carry(bundle.path / name, directory / name, graph_data)
    config = bundle.model_config
    manifest = dataclasses.replace(
        bundle.manifest, files={**bundle.manifest.files, **rewritten},
        graphs={graph: with_probes(spec, probes[graph], width=config["d_model"],
                                   heads=config["num_heads"])
                for graph, spec in bundle.graphs.items()})
    return Bundle(path=directory, manifest=manifest)


EngineBuilder = Callable[..., object]  # `ferry.export.tensorrt_build.build_engines`


def load_probed(probed: Bundle, backend: str, log=lambda message: None,
                build_engines: EngineBuilder | None = None):
    """`backend` (`name[:precision]`; no precision: fp32, not the fused graphs a CPU would
    pick) loaded on a `probed_bundle`: torch with the growing cache its probes are recorded
    on, TensorRT on engines `build_engines` (the exporter's, passed in: the runtime does not
    import the export package) builds there from the marked graphs."""
    from ferry.runtime.model import load

    kind, precision = parse_backend(backend)[0], precision_of(backend)
    if kind == "tensorrt":
        if build_engines is None:
            raise FerryError("TensorRT needs engines of the marked graphs: pass build_engines="
                             "ferry.export.tensorrt_build.build_engines (the CLI does)")
        build_engines(probed, precision=precision, log=log)
    log(f"running the probed graphs on {backend}")
    return load(probed, backend=f"{backend.partition(':')[0]}:{precision}",
                **({"static_cache": False} if kind == "torch" else {}))


def precision_of(backend: str) -> str:
    return parse_backend(backend)[1].get("precision", "fp32")


def tolerance_rule(precision: str) -> tuple[str, Callable[[TensorDiff], bool]]:
    """What a state's difference must meet under `precision`, in words, and the test of
    whether it is past that: the parity gate of that precision (max |Δ| for fp32, the 99th
    percentile for 16-bit, each relative to the state's magnitude where that is larger), for
    quantised graphs `Q99_SHARE` of the state's largest magnitude. NaN or Inf is always past."""
    tolerance, share = tolerance_for(precision), Q99_SHARE.get(precision, 0.05)
    atol, floor = tolerance.atol, tolerance.q99_atol or 0.0

    def past(diff: TensorDiff) -> bool:
        if not np.isfinite(diff.max_abs):
            return True
        if atol is not None:
            return diff.max_abs > max(atol, FP32_RTOL * diff.scale)
        return diff.q99_abs > max(floor, share * diff.scale)

    if atol is not None:
        return f"max |Δ| ≤ {atol:.0e} or ≤ {FP32_RTOL:.0e} × max |ref|", past
    if floor:
        return f"99th percentile |Δ| ≤ {floor:.0e} or ≤ {share:g} × max |ref|", past
    return f"99th percentile |Δ| ≤ {share:g} × max |ref|", past


def _probe_lists(bundle: Bundle, backends: list[str]) -> tuple[dict, dict]:
    """Per graph, the probes both sides' graphs name (torch: those of the fp32 graphs) and
    those only one has (fused away)."""
    common, unprobed = {}, {}
    for graph in bundle.graphs:
        lists = [graph_probes(bundle.graph_file(graph, precision_of(b))) for b in backends]
        every = list(dict.fromkeys(n for names in lists for n in names))
        common[graph] = [n for n in every if all(n in names for names in lists)]
        missing = [n for n in every if n not in common[graph]]
        if missing:
            unprobed[graph] = missing
    if not any(common.values()):
        raise FerryError(f"the graphs of bundle {bundle.path} name no probes (exported before "
                         "ferry named them); re-export the bundle to bisect it")
    return common, unprobed


def bisect(bundle: Bundle, reference: str, candidate: str, *, workdir: Path,
           precision: str | None = None, log=lambda message: None,
           build_engines: EngineBuilder | None = None) -> Bisection:
    """Run every graph of `bundle` on its golden inputs on `reference` and `candidate`
    (`backend[:precision]` names) with the probes marked; diff them probe by probe.

    Args:
        workdir: an empty scratch directory for the probed bundles (and TensorRT engines).
        precision: the tolerance to apply; default: the candidate's precision.
        build_engines: for a TensorRT side, `ferry.export.tensorrt_build.build_engines`.
    """
    precision = precision or precision_of(candidate)
    probes, unprobed = _probe_lists(bundle, [reference, candidate])
    golden = load_golden(bundle.file("golden"))
    probed = probed_bundle(bundle, [precision_of(reference), precision_of(candidate)], probes,
                           workdir)
    feeds = {graph: golden_arrays(golden, graph, "in") for graph in bundle.graphs}
    outputs = {}
    for i, backend in enumerate((reference, candidate)):
        with load_probed(probed, backend, log, build_engines) as model:  # closed: buffers freed
            outputs[i] = {graph: model.graphs[graph].infer(feed) for graph, feed in feeds.items()}
    criterion, past = tolerance_rule(precision)
    result = Bisection(reference, candidate, precision, criterion, unprobed=unprobed)
    for graph, feed in feeds.items():
        expected, got = outputs[0][graph], outputs[1][graph]
        order = probes[graph] + [n for n in bundle.graphs[graph].output_names]
        for diff in diff_outputs(graph, {n: expected[n] for n in order},
                                 {n: got[n] for n in order}, None, feed=feed):
            result.diffs.append(ProbeDiff(graph, diff.output, diff.max_abs, diff.q99_abs,
                                          diff.scale, past(diff)))
    return result
