"""torch → ONNX for one graph, driven entirely by its `GraphSpec`.

Uses the torch.export-based exporter (`torch.onnx.export(dynamo=True)`): symbolic dims come from
the spec's names and ranges, opset ≥ 17 gives a native `LayerNormalization`, and the graphs hold no
control flow. After export the graph is checked (`onnx.checker`, shape inference) and refused if
it contains `If` / `Loop` nodes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
import torch

from ferry.errors import FerryError
from ferry.graph_spec import DERIVED_DIMS, GraphSpec
from ferry.model.probes import ProbedGraph

MIN_OPSET = 17
DEFAULT_OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # above this, weights go to a side file (protobuf's 2 GB cap)
FORBIDDEN_OPS = {"If", "Loop", "Scan"}


def example_inputs(spec: GraphSpec, *, vocab_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Tracing inputs in spec order. Every symbolic dim gets a distinct size ≥ 2, so torch.export
    neither specialises a dim to 0/1 nor confuses two dims of equal size."""
    generator = torch.Generator().manual_seed(seed)
    sizes = {name: 2 + i for i, name in enumerate(sorted(spec.dims))}
    for name, parts in DERIVED_DIMS.items():
        if name in sizes:  # a part the graph lacks is one position (see DERIVED_DIMS)
            sizes[name] = sum(sizes.get(part, 1) for part in parts)
    tensors = []
    for tensor in spec.inputs:
        shape = [sizes[d] if isinstance(d, str) else d for d in tensor.shape]
        if tensor.name == "cache_position" or (tensor.dtype == "int64" and "mask" in tensor.name):
            # all-ones masks; a static cache's write position 1
            tensors.append(torch.ones(shape, dtype=torch.long))
        elif tensor.name == "token_type_ids":
            tensors.append(torch.zeros(shape, dtype=torch.long))
        elif tensor.dtype == "int64":
            tensors.append(torch.randint(0, vocab_size, shape, generator=generator))
        else:
            tensors.append(torch.randn(shape, generator=generator))
    return tuple(tensors)


def dynamic_shapes(spec: GraphSpec) -> tuple:
    """torch.export dynamic shapes, one `Dim` per symbolic name, shared across inputs; a
    derived dim (`DERIVED_DIMS`) is one part plus the positions of the parts the graph lacks
    (an encoder-decoder step's past_len + 1), or else left for torch.export to express
    through its parts."""
    dims = {name: torch.export.Dim(name, min=r.min, max=r.max)
            for name, r in spec.dims.items() if name not in DERIVED_DIMS}
    for name, parts in DERIVED_DIMS.items():
        if name in spec.dims:
            present = [part for part in parts if part in dims]
            dims[name] = (dims[present[0]] + (len(parts) - 1) if len(present) == 1
                          else torch.export.Dim.AUTO)
    per_input = tuple(
        {axis: dims[d] for axis, d in enumerate(t.shape) if isinstance(d, str)}
        for t in spec.inputs
    )
    return (per_input,)  # the graph modules take `*inputs`


@contextlib.contextmanager
def quiet_loggers(*names: str):
    """Within this block the named loggers ("" for the root) log errors only: the exporter,
    the transformer optimizer and the quantizers log copiously about things that do not concern
    ferry's graphs."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs and warns copiously about things that do not concern ferry's graphs."""
    with (quiet_loggers("torch.onnx", "torch.export", "torch._dynamo"),
          warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO())):
        warnings.simplefilter("ignore")
        yield


def export_graph(module: torch.nn.Module, spec: GraphSpec, path: Path, *, vocab_size: int,
                 opset: int = DEFAULT_OPSET, translations: dict | None = None) -> list[Path]:
    """Export `module` (a `ferry.model.graphs` wrapper) to `path`; returns the files written.

    Args:
        translations: ONNX translations of custom torch operators (the exporter's
            `custom_translation_table`), e.g. `ferry.export.fused_graphs`'s fused attention.
    """
    if opset < MIN_OPSET:
        raise FerryError(f"opset {opset} is too old: ferry exports opset ≥ {MIN_OPSET} "
                         "(native LayerNormalization)")
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    inputs = example_inputs(spec, vocab_size=vocab_size)
    probes: list[str] = []  # the probes the traced graph returns after its outputs, filled
    # while tracing (torch.export restores the module's own attributes afterwards)
    with _quiet_exporter():
        program = torch.onnx.export(
            ProbedGraph(module.eval(), traced_names=probes), inputs, dynamo=True,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=dynamic_shapes(spec), opset_version=opset, optimize=True,
            verbose=False, custom_translation_table=translations,
        )
        program.save(str(path), external_data=external)
    model = onnx.load(str(path), load_external_data=False)  # weights stay where they are
    unmark_probes(model, spec, probes)
    name_dims(model, spec)
    onnx.save(model, str(path))
    check_graph(path, spec, opset)
    data_file = external_data_file(path)
    return [path, data_file] if external and data_file.exists() else [path]


def unmark_probes(model: onnx.ModelProto, spec: GraphSpec, probes: list[str]) -> None:
    """Name the values of the probe outputs the export traced after the spec's outputs
    (`ferry.model.probes`), then drop those outputs: each stays in the graph as the named value
    it was, unless the exporter copied it from another value (an `Identity`, e.g. a post-norm
    encoder's last layer is its output), which goes. In place."""
    graph = model.graph
    traced = [o.name for o in graph.output[len(spec.outputs):]]
    if len(traced) != len(probes):
        raise FerryError(f"exported {spec.name} has {len(traced)} outputs past the spec's, "
                         f"but the trace recorded {len(probes)} probes")
    renamed = dict(zip(traced, probes))
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        node.output[:] = [renamed.get(name, name) for name in node.output]
    for value in graph.value_info:
        value.name = renamed.get(value.name, value.name)
    copies = [n for n in graph.node if n.op_type == "Identity" and n.output[0] in probes]
    for node in copies:
        graph.node.remove(node)
    del graph.output[len(spec.outputs):]


def external_data_file(graph: Path) -> Path:
    """Where a graph too big for one protobuf keeps its weights: `<graph>.data` beside it."""
    return graph.with_name(graph.name + ".data")


def name_dims(model: onnx.ModelProto, spec: GraphSpec) -> None:
    """Give every graph input and output the spec's dim names (the exporter names output dims
    after expressions such as `past_len + 1`). In place."""
    declared = {t.name: t.shape for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        for dim, name in zip(value.type.tensor_type.shape.dim, declared[value.name]):
            if isinstance(name, str):
                dim.dim_param = name


def check_graph(path: Path, spec: GraphSpec, opset: int | None = None) -> None:
    """onnx.checker + shape inference; I/O names and dims as declared; no control-flow nodes;
    the default domain at `opset` (the exporter may quietly write another one)."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and written != opset:
        raise FerryError(f"opset {opset} was asked for but the exporter wrote opset {written}; "
                         f"choose --opset {written} (or another this torch exports)")
    graph = model.graph
    names = ([i.name for i in graph.input], [o.name for o in graph.output])
    if names != (spec.input_names, spec.output_names):
        raise FerryError(f"exported {spec.name} has I/O {names}, spec declares "
                         f"{(spec.input_names, spec.output_names)}")
    for value, tensor in zip((*graph.input, *graph.output), (*spec.inputs, *spec.outputs)):
        dims = tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)
        if dims != tensor.shape:
            raise FerryError(f"exported {spec.name}: {tensor.name} has dims {list(dims)}, the "
                             f"spec declares {list(tensor.shape)}")
    control = sorted({n.op_type for n in graph.node} & FORBIDDEN_OPS)
    if control:
        raise FerryError(f"exported {spec.name} contains control-flow ops {control}; ferry "
                         "graphs must be free of them (slow on GPU, break TensorRT builds)")
